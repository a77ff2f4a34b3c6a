"""Every accounting passes one suite (flexkv_store.quota.testing) and a state machine
against a dict model; the shared ones also across real processes (test_shared_quota.py)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from flexkv_store.config import load_config
from flexkv_store.errors import ConfigError, QuotaExceededError
from flexkv_store.quota import Accounting, LocalAccounting, UserLRU
from flexkv_store.quota._sqlite import SqliteAccounting
from flexkv_store.quota.testing import AccountingTests, Make, k, put
from flexkv_store.store import accounting_for


class TestLocal(AccountingTests):
    @pytest.fixture
    async def make(self) -> Make:
        async def factory(
            default_quota: int | None = None, capacity: int | None = None, **_: Any
        ) -> Accounting:
            acct = LocalAccounting(UserLRU(default_quota=default_quota, capacity=capacity))
            await acct.open()
            return acct

        return factory


class TestSqlite(AccountingTests):
    @pytest.fixture
    async def make(self, tmp_path: Path) -> AsyncIterator[Make]:
        made: list[Accounting] = []

        async def factory(
            default_quota: int | None = None,
            capacity: int | None = None,
            same_state: bool = False,
        ) -> Accounting:
            path = tmp_path / "acct.sqlite"
            if not same_state and made:
                path = tmp_path / f"acct{len(made)}.sqlite"
            acct = SqliteAccounting(path, default_quota=default_quota, capacity=capacity)
            await acct.open()
            made.append(acct)
            return acct

        yield factory
        for acct in made:
            await acct.close()


class TestRedis(AccountingTests):
    """Against a real redis-server (standalone), a fresh key prefix per test."""

    cluster = False

    @pytest.fixture
    async def make(self, request: pytest.FixtureRequest) -> AsyncIterator[Make]:
        from servers import unique_prefix

        from flexkv_store.backends.config import RedisConfig
        from flexkv_store.quota._redis_acct import RedisAccounting

        server = request.getfixturevalue("redis_cluster" if self.cluster else "redis_server")
        made: list[Accounting] = []
        prefix = unique_prefix()

        async def factory(
            default_quota: int | None = None,
            capacity: int | None = None,
            same_state: bool = False,
        ) -> Accounting:
            own = prefix if same_state or not made else unique_prefix()
            cfg = RedisConfig.from_url(server.url)
            cfg = cfg.model_copy(update={"key_prefix": own})
            acct = RedisAccounting(cfg, default_quota=default_quota, capacity=capacity)
            await acct.open()
            made.append(acct)
            return acct

        yield factory
        for acct in made:
            await acct.close()

    async def test_an_undone_batch_never_leaves_a_salt_over_quota(
        self, make: Make, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch over two salts: alice's part evicts k1 to make room, bob's refuses (a
        write in flight elsewhere), and meanwhile another process takes the room alice's
        part leaves when undone. The undo is one script per salt: k1 comes back, does not
        fit, and is evicted again, an orphan the caller deletes."""
        from flexkv_store.quota._redis_acct import RedisAccounting

        acct = await make()
        other = await make(same_state=True)
        assert isinstance(acct, RedisAccounting)
        await acct.set_quota("alice", 20)
        await acct.set_quota("bob", 10)
        await put(acct, k(1), 10)
        await put(acct, k(2), 10)
        await other.admit([(k(9, "bob"), 10)], each=False)  # bob: taken by a write in flight
        real = acct._call

        async def racing(name: str, salt: str, args: Any) -> Any:
            if name == "admit" and salt == "bob":
                await other.admit([(k(5), 5)], each=False)  # alice has 5 left: 10 + 5
            return await real(name, salt, args)

        monkeypatch.setattr(acct, "_call", racing)
        with pytest.raises(QuotaExceededError, match="in flight"):
            await acct.admit([(k(3), 5), (k(4, "bob"), 5)], each=False)
        assert await acct.usage("alice") == (15, 2)  # k2 and the other's k5: never over
        assert acct.take_orphans() == [(k(1), 10)]
        assert await acct.contains([k(1), k(2), k(3), k(5)]) == [False, True, False, True]


class TestRedisCluster(TestRedis):
    """Against the 3-node Cluster: every salt's keys in one slot."""

    cluster = True

    async def test_capacity_evicts_globally(self, make: Make) -> None:
        """A global order would live in one slot: a capacity is refused on Cluster."""
        with pytest.raises(ConfigError, match="Cluster"):
            await make(capacity=100)


def test_cluster_accounting_refuses_a_capacity() -> None:
    from flexkv_store.backends.config import RedisConfig
    from flexkv_store.quota._redis_acct import RedisAccounting

    cfg = RedisConfig.from_url("redis+cluster://127.0.0.1:7000")
    with pytest.raises(ConfigError, match="Cluster"):
        RedisAccounting(cfg, capacity=10)


def test_accounting_config(tmp_path: Path) -> None:
    cfg = load_config({"backend": f"fs://{tmp_path}", "quota": {"accounting": "sqlite"}})
    acct = accounting_for(cfg)
    assert isinstance(acct, SqliteAccounting)
    assert acct.path == tmp_path / "flexkv-accounting.sqlite"
    cfg = load_config(
        {"backend": "memory://", "quota": {"accounting": f"sqlite://{tmp_path}/a.db"}}
    )
    assert accounting_for(cfg).describe() == f"sqlite:{tmp_path}/a.db"
    with pytest.raises(ConfigError, match="first fs backend"):
        accounting_for(load_config({"backend": "memory://", "quota": {"accounting": "sqlite"}}))
    with pytest.raises(ConfigError, match="accounting"):
        load_config({"backend": "memory://", "quota": {"accounting": "mysql://x"}})


# -- a state machine against a dict model ------------------------------------------------------

SALTS = ["", "alice", "bob"]


class Model:
    """UserLRU's rules in the plainest form: one OrderedDict per salt."""

    def __init__(self) -> None:
        self.objects: dict[str, OrderedDict[int, int]] = {s: OrderedDict() for s in SALTS}
        self.quotas: dict[str, int] = {}

    def used(self, salt: str) -> int:
        return sum(self.objects[salt].values())

    def put(self, salt: str, i: int, size: int) -> bool:
        limit = self.quotas.get(salt)
        if limit is not None and (size > limit or limit == 0):
            return False
        objs = self.objects[salt]
        objs.pop(i, None)
        while limit is not None and objs and self.used(salt) + size > limit:
            objs.popitem(last=False)
        objs[i] = size
        return True

    def shrink(self, salt: str) -> None:
        limit = self.quotas.get(salt)
        objs = self.objects[salt]
        while limit is not None and objs and self.used(salt) > limit:
            objs.popitem(last=False)


class AccountingMachine(RuleBasedStateMachine):
    """Random puts, touches, removes and quota changes: the accounting equals the model."""

    factory: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.acct: Accounting = self.loop.run_until_complete(type(self).factory())
        self.model = Model()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @rule(salt=st.sampled_from(SALTS), i=st.integers(0, 7), size=st.integers(0, 60))
    def do_put(self, salt: str, i: int, size: int) -> None:
        ok = self.model.put(salt, i, size)
        try:
            self.run(put(self.acct, k(i, salt), size))
        except QuotaExceededError:
            assert not ok
        else:
            assert ok

    @rule(salt=st.sampled_from(SALTS), i=st.integers(0, 7))
    def do_touch(self, salt: str, i: int) -> None:
        if i in self.model.objects[salt]:
            self.model.objects[salt].move_to_end(i)
        self.acct.touch([k(i, salt)])
        self.run(self.acct.flush())

    @rule(salt=st.sampled_from(SALTS), i=st.integers(0, 7))
    def do_remove(self, salt: str, i: int) -> None:
        self.model.objects[salt].pop(i, None)
        self.run(self.acct.remove([k(i, salt)]))

    @rule(salt=st.sampled_from(SALTS), limit=st.integers(0, 120))
    def do_set_quota(self, salt: str, limit: int) -> None:
        self.model.quotas[salt] = limit
        self.model.shrink(salt)
        self.run(self.acct.set_quota(salt, limit))

    @rule(salt=st.sampled_from(SALTS))
    def do_delete_quota(self, salt: str) -> None:
        self.model.quotas.pop(salt, None)
        self.run(self.acct.delete_quota(salt))

    @invariant()
    def same_as_model(self) -> None:
        for salt in SALTS:
            order = [key for key, _ in self.run(self.acct.lru_order(salt))]
            assert order == [k(i, salt) for i in self.model.objects[salt]]
            used = self.run(self.acct.usage(salt))
            assert used == (self.model.used(salt), len(self.model.objects[salt]))
            limit = self.model.quotas.get(salt)
            assert limit is None or used.nbytes <= limit

    def teardown(self) -> None:
        self.run(self.acct.close())
        self.loop.close()


@pytest.mark.parametrize("kind", ["local", "sqlite", "redis"])
def test_accounting_state_machine(
    kind: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if kind == "redis" else ""

    async def factory() -> Accounting:
        from servers import unique_prefix

        from flexkv_store.backends.config import RedisConfig
        from flexkv_store.quota._redis_acct import RedisAccounting

        acct: Accounting
        if kind == "local":
            acct = LocalAccounting()
        elif kind == "sqlite":
            acct = SqliteAccounting(tmp_path_factory.mktemp("sm") / "acct.sqlite")
        else:
            cfg = RedisConfig.from_url(url).model_copy(update={"key_prefix": unique_prefix()})
            acct = RedisAccounting(cfg)
        await acct.open()
        return acct

    machine = type(f"Machine_{kind}", (AccountingMachine,), {"factory": staticmethod(factory)})
    run_state_machine_as_test(
        machine, settings=settings(max_examples=25, stateful_step_count=30, deadline=None)
    )


def test_sqlite_open_waits_for_another_process_creating_the_database(tmp_path: Path) -> None:
    # Several engine processes create one accounting database together; switching it to
    # WAL needs an exclusive lock, which SQLite refuses at once (no busy handler) while
    # another connection holds one. The open waits, it does not fail.
    import sqlite3
    import threading

    from flexkv_store.quota import _sqlite

    path = tmp_path / "flexkv-accounting.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    opener = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        opener.execute("PRAGMA journal_mode=WAL")  # what the open used to meet
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        _sqlite._switch_to_wal(opener)
    finally:
        release.join()
    assert opener.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    opener.close()
    holder.close()


def test_sqlite_open_gives_up_after_its_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from flexkv_store.quota import _sqlite

    monkeypatch.setattr(_sqlite, "_OPEN_WAIT_S", 0.05)
    path = tmp_path / "flexkv-accounting.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    opener = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _sqlite._switch_to_wal(opener)
    holder.execute("COMMIT")
    opener.close()
    holder.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_close_ends_even_if_a_flush_swallows_its_cancellation(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # A client library may swallow the CancelledError that close() sends the touch loop
    # while it is inside a command (seen in CI: a worker's close() then waited forever).
    if kind == "sqlite":
        acct: Any = SqliteAccounting(tmp_path / "acct.sqlite", touch_interval=0.01)
    else:
        from servers import unique_prefix

        from flexkv_store.backends.config import RedisConfig
        from flexkv_store.quota._redis_acct import RedisAccounting

        cfg = RedisConfig.from_url(request.getfixturevalue("redis_server").url)
        cfg = cfg.model_copy(update={"key_prefix": unique_prefix()})
        acct = RedisAccounting(cfg, touch_interval=0.01)
    await acct.open()
    inside = asyncio.Event()

    async def stubborn() -> None:
        inside.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass  # what the misbehaving library does

    acct.flush = stubborn
    await asyncio.wait_for(inside.wait(), 5)
    await asyncio.wait_for(acct.close(), 5)
    assert acct._touch_task.done()
