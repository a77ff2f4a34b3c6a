"""The Store: tiers, quotas through the store, persistence and rebuild, concurrency."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from flexkv_store.backends import L2Adapter, open_adapter
from flexkv_store.backends._memory import MemoryAdapter
from flexkv_store.errors import QuotaExceededError, StorageError
from flexkv_store.keyformat import ObjectKey
from flexkv_store.quota import JsonQuotaState, UserLRU
from flexkv_store.store import Store, open_store

SALTS = ["", "alice", "bob"]


def key(i: int, salt: str = "alice", model: str = "m") -> ObjectKey:
    return ObjectKey(model, 0, i.to_bytes(4, "big"), salt)


async def stored(store: Store) -> dict[ObjectKey, int]:
    return {i.key: i.size async for i in store.scan()}


class FailingAdapter(MemoryAdapter):
    """A memory adapter whose every call fails, as a backend that is down."""

    name = "failing"

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def get(self, key: ObjectKey) -> bytes | None:
        if self.down:
            raise StorageError("down")
        return await super().get(key)

    async def get_into(self, key: ObjectKey, out: Any) -> int | None:
        if self.down:
            raise StorageError("down")
        return await super().get_into(key, out)

    async def put(self, key: ObjectKey, data: Any) -> None:
        if self.down:
            raise StorageError("down")
        await super().put(key, data)

    async def size(self, key: ObjectKey) -> int | None:
        if self.down:
            raise StorageError("down")
        return await super().size(key)


async def test_put_get_delete_and_prefix() -> None:
    async with Store([open_adapter("memory://")]) as store:
        keys = [key(i) for i in range(4)]
        await store.put_many([(k, bytes([i]) * 10) for i, k in enumerate(keys[:3])])
        assert await store.get(keys[1]) == b"\x01" * 10
        assert await store.get(keys[3]) is None
        assert await store.lookup_prefix(keys) == 3
        assert await store.lookup_prefix([keys[3], *keys[:3]]) == 0
        assert await store.contains(keys[0])
        assert await store.delete(keys[0]) is True
        assert await store.delete(keys[0]) is False
        assert await store.lookup_prefix(keys) == 0
        assert store.lru.usage("alice").objects == 2
        out = bytearray(16)
        assert await store.get_into(keys[2], out) == 10
        assert bytes(out[:10]) == b"\x02" * 10


async def test_l1_tier_and_promotion() -> None:
    slow, fast = MemoryAdapter(), MemoryAdapter()
    k = key(1)
    await slow.put(k, b"x" * 10)  # written before this store opened, e.g. by another worker
    async with Store([fast, slow], l1_capacity_bytes=25) as store:
        assert await store.get(k) == b"x" * 10
        await store.wait_idle()  # backend promotion runs in the background
        assert await fast.get(k) == b"x" * 10, "a hit in a later backend is promoted"
        assert store.info()["l1"]["objects"] == 1
        await fast.delete(k)
        await slow.delete(k)
        assert await store.get(k) == b"x" * 10, "served from L1"
        for i in range(2, 6):
            await store.put(key(i), b"y" * 10)
        assert store.info()["l1"]["used_bytes"] <= 25


async def test_backend_down_reads_miss_writes_fail_clearly() -> None:
    bad = FailingAdapter()
    async with Store([bad], metrics=True) as store:
        assert await store.get(key(1)) is None
        with pytest.raises(StorageError, match="no backend accepted"):
            await store.put(key(1), b"data")
        assert store.lru.usage("alice").objects == 0, "a failed put is rolled back"
        text = store.metrics.render().decode() if store.metrics else ""
        assert 'flexkv_store_backend_errors_total{backend="failing",error="storage",op="get"}' in (
            text
        )
        bad.down = False
        await store.put(key(1), b"data")
        assert await store.get(key(1)) == b"data"


async def test_one_backend_down_of_two_keeps_serving() -> None:
    bad, good = FailingAdapter(), MemoryAdapter()
    async with Store([bad, good]) as store:
        await store.put(key(1), b"v")
        assert await store.get(key(1)) == b"v"


async def test_quota_is_hard_and_per_salt() -> None:
    async with Store([open_adapter("memory://")], quotas={"alice": 100}) as store:
        with pytest.raises(QuotaExceededError):
            await store.put(key(0), b"z" * 101)
        assert await stored(store) == {}
        for i in range(5):
            await store.put(key(i, "bob"), b"b" * 50)
        for i in range(10):
            await store.put(key(i), b"a" * 30)
            assert store.lru.usage("alice").nbytes <= 100
        on_disk = await stored(store)
        assert sum(n for k, n in on_disk.items() if k.cache_salt == "alice") == 90
        assert sum(1 for k in on_disk if k.cache_salt == "bob") == 5, "bob lost nothing"
        evicted = await store.quota.set_quota("alice", 30)
        assert evicted.objects == 2
        assert {k for k in await stored(store) if k.cache_salt == "alice"} == {key(9)}


async def test_batch_refused_whole_when_one_object_is_too_big() -> None:
    async with Store([open_adapter("memory://")], quotas={"alice": 100}) as store:
        await store.put(key(0), b"a" * 50)
        with pytest.raises(QuotaExceededError):
            await store.put_many([(key(1), b"a" * 10), (key(2), b"a" * 101)])
        assert await stored(store) == {key(0): 50}


async def test_batch_larger_than_quota_keeps_the_newest() -> None:
    async with Store([open_adapter("memory://")], quotas={"alice": 100}) as store:
        await store.put_many([(key(i), b"a" * 40) for i in range(5)])
        assert await stored(store) == {key(3): 40, key(4): 40}
        assert store.lru.usage("alice") == (80, 2)


async def test_allowlist_mode() -> None:
    lru = UserLRU(default_quota=0)
    async with Store([open_adapter("memory://")], lru=lru, quotas={"alice": 10}) as store:
        await store.put(key(1, "alice"), b"ok")
        with pytest.raises(QuotaExceededError):
            await store.put(key(1, "mallory"), b"no")


async def test_global_capacity_evicts_globally() -> None:
    lru = UserLRU(capacity=100)
    async with Store([open_adapter("memory://")], lru=lru) as store:
        await store.put(key(1, "alice"), b"a" * 60)
        await store.put(key(1, "bob"), b"b" * 60)
        assert await stored(store) == {key(1, "bob"): 60}


async def test_concurrent_puts_never_exceed_the_quota() -> None:
    limit = 1000
    async with Store([open_adapter("memory://")], quotas={"alice": limit}) as store:
        peak = 0

        async def writer(w: int) -> None:
            nonlocal peak
            for i in range(25):
                await store.put(key(w * 100 + i), bytes(37 + (w * i) % 50))
                peak = max(peak, store.lru.usage("alice").nbytes)

        await asyncio.gather(*(writer(w) for w in range(16)))
        assert peak <= limit
        on_disk = await stored(store)
        assert sum(on_disk.values()) == store.lru.usage("alice").nbytes <= limit
        assert len(on_disk) == store.lru.usage("alice").objects


async def test_quotas_persist_and_usage_is_rebuilt(tmp_path: Path) -> None:
    cfg = {
        "backend": "memory://",
        "quota": {"state_path": str(tmp_path / "q.json"), "quotas": {"carol": 5}},
    }
    shared = MemoryAdapter()
    state = JsonQuotaState(tmp_path / "q.json")
    async with Store([shared], quota_state=state, quotas={"carol": 5}) as store:
        await store.quota.set_quota("alice", 1000)
        await store.put(key(1), b"x" * 300)
        await store.put(key(2, ""), b"y" * 7)
    # the memory adapter keeps its dict after aclose: a restart over the same data
    async with Store([shared], quota_state=state, quotas={"carol": 5}) as again:
        assert again.quota.get_quota("alice") == 1000
        assert again.quota.get_quota("carol") == 5
        assert again.lru.usage("alice") == (300, 1)
        assert again.lru.usage("") == (7, 1)
    assert cfg  # the same config works through open_store
    store2 = open_store(cfg)
    async with store2:
        assert store2.quota.get_quota("alice") == 1000


def test_blocking_facade_from_threads() -> None:
    import concurrent.futures

    with open_store("memory://").blocking() as b:

        def work(i: int) -> bytes | None:
            b.put(key(i), bytes([i]) * 3)
            return b.get(key(i))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(work, range(20)))
        assert results == [bytes([i]) * 3 for i in range(20)]
        assert b.lookup_prefix([key(0), key(1), key(99)]) == 2
        b.set_quota("alice", 30)
        assert b.get_quota("alice") == 30
        assert len(b.scan(cache_salt="alice")) == 10


# -- the state machine ---------------------------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """The store against a model of DESIGN section 4, with close and reopen."""

    backend_kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(self.loop.run_until_complete(asyncio.to_thread(_mkdtemp)))
        self.shared: L2Adapter | None = None
        self.quotas: dict[str, int] = {}
        # per salt: key -> size, in LRU order (first = least recently used)
        self.model: dict[str, dict[ObjectKey, int]] = {s: {} for s in SALTS}
        self.data: dict[ObjectKey, bytes] = {}
        self.counter = itertools.count()
        self.store = self._open()

    def _backend(self) -> L2Adapter:
        if self.backend_kind == "memory":
            if self.shared is None:
                self.shared = MemoryAdapter()
            return self.shared
        return open_adapter({"type": "fs", "path": str(self.tmp / "data"), "io_engine": "threads"})

    def _open(self) -> Store:
        store = Store([self._backend()], quota_state=JsonQuotaState(self.tmp / "q.json"))
        self.loop.run_until_complete(store.open())
        return store

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def quota_of(self, salt: str) -> int | None:
        return self.quotas.get(salt)

    def _evict_to(self, salt: str, limit: int | None, incoming: int = 0) -> None:
        if limit is None:
            return
        lru = self.model[salt]
        # a zero limit holds nothing, not even empty objects (allowlist mode)
        while lru and (sum(lru.values()) + incoming > limit or limit == 0):
            victim = next(iter(lru))
            del lru[victim]
            self.data.pop(victim, None)

    @rule(salt=st.sampled_from(SALTS), i=st.integers(0, 6), size=st.integers(0, 120))
    def put(self, salt: str, i: int, size: int) -> None:
        k = key(i, salt)
        payload = bytes([next(self.counter) % 256]) * size
        limit = self.quota_of(salt)
        if limit is not None and (size > limit or limit == 0):
            with pytest.raises(QuotaExceededError):
                self.run(self.store.put(k, payload))
            return
        self.run(self.store.put(k, payload))
        lru = self.model[salt]
        lru.pop(k, None)
        self._evict_to(salt, limit, size)
        lru[k] = size
        self.data[k] = payload

    @rule(salt=st.sampled_from(SALTS), i=st.integers(0, 6))
    def get(self, salt: str, i: int) -> None:
        k = key(i, salt)
        got = self.run(self.store.get(k))
        assert got == self.data.get(k)
        if k in self.model[salt]:
            self.model[salt][k] = self.model[salt].pop(k)  # a hit is most recently used

    @rule(salt=st.sampled_from(SALTS), i=st.integers(0, 6))
    def delete(self, salt: str, i: int) -> None:
        k = key(i, salt)
        assert self.run(self.store.delete(k)) == (k in self.model[salt])
        self.model[salt].pop(k, None)
        self.data.pop(k, None)

    @rule(salt=st.sampled_from(SALTS), limit=st.integers(0, 400))
    def set_quota(self, salt: str, limit: int) -> None:
        self.run(self.store.quota.set_quota(salt or "_default", limit))
        self.quotas[salt] = limit
        self._evict_to(salt, limit)

    @rule(salt=st.sampled_from(SALTS))
    def delete_quota(self, salt: str) -> None:
        assert self.run(self.store.quota.delete_quota(salt or "_default")) == (salt in self.quotas)
        self.quotas.pop(salt, None)

    @rule()
    def reopen(self) -> None:
        self.run(self.store.close())
        self.store = self._open()
        # After a restart the order comes from modification times (ties are unordered):
        # take the store's order, after checking it holds exactly the model's objects.
        for salt in SALTS:
            rebuilt = dict(self.store.lru.iter_lru(salt))
            assert rebuilt == self.model[salt]
            self.model[salt] = rebuilt

    @invariant()
    def agrees_with_model(self) -> None:
        on_backend = self.run(stored(self.store))
        expected = {k: n for lru in self.model.values() for k, n in lru.items()}
        assert on_backend == expected
        for salt in SALTS:
            used = self.store.lru.usage(salt)
            assert used.nbytes == sum(self.model[salt].values())
            assert used.objects == len(self.model[salt])
            limit = self.quota_of(salt)
            assert limit is None or used.nbytes <= limit
            assert self.store.quota.get_quota(salt or "_default") == self.quotas.get(salt)
            assert list(dict(self.store.lru.iter_lru(salt))) == list(self.model[salt])

    def teardown(self) -> None:
        import shutil

        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _mkdtemp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="flexkv-store-sm-")


MACHINE_SETTINGS = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


def test_store_state_machine_memory() -> None:
    run_state_machine_as_test(StoreMachine, settings=MACHINE_SETTINGS)


class FsStoreMachine(StoreMachine):
    backend_kind = "fs"


def test_store_state_machine_fs() -> None:
    run_state_machine_as_test(FsStoreMachine, settings=MACHINE_SETTINGS)


async def test_corrupt_objects_are_counted_in_metrics(tmp_path: Path) -> None:
    cfg = {"backend": {"type": "fs", "path": str(tmp_path), "layout": "flat"}}
    async with open_store(cfg) as store:
        k = key(1)
        await store.put(k, b"payload" * 100)
        path = tmp_path / k.to_filename()
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
        assert await store.get(k) is None
        assert store.metrics is not None
        text = store.metrics.render().decode()
        assert 'flexkv_store_corrupt_objects_total{backend="fs"} 1.0' in text


# -- regressions found in review ---------------------------------------------------------


class SlowAdapter(MemoryAdapter):
    """A memory adapter whose puts and gets wait for the test to release them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def put(self, key: ObjectKey, data: Any) -> None:
        await self.gate.wait()
        await super().put(key, data)

    async def get(self, key: ObjectKey) -> bytes | None:
        data = await super().get(key)
        await self.gate.wait()
        return data


async def test_quota_lowered_while_a_batch_waits_leaves_nothing_half_done() -> None:
    slow = SlowAdapter()
    async with Store([slow], quotas={"s": 100}) as store:
        slow.gate.clear()
        first = asyncio.create_task(store.put(key(0, "s"), b"x" * 10))
        await asyncio.sleep(0.01)
        lower = asyncio.create_task(store.quota.set_quota("s", 30))
        batch = asyncio.create_task(
            store.put_many([(key(1, "s"), b"a" * 5), (key(2, "s"), b"b" * 50)])
        )
        await asyncio.sleep(0.01)
        slow.gate.set()
        await asyncio.gather(first, lower)
        with pytest.raises(QuotaExceededError):
            await batch
        assert await stored(store) == {key(0, "s"): 10}
        assert store.lru.usage("s") == (10, 1)


async def test_multi_salt_batch_and_quota_change_do_not_deadlock() -> None:
    slow = SlowAdapter()
    async with Store([slow]) as store:
        slow.gate.clear()
        w_b = asyncio.create_task(store.put(key(1, "b"), b"1"))
        await asyncio.sleep(0.01)
        w_a = asyncio.create_task(store.put(key(1, "a"), b"1"))
        await asyncio.sleep(0.01)
        both = asyncio.create_task(store.put_many([(key(2, "a"), b"2"), (key(2, "b"), b"2")]))
        change = asyncio.create_task(store.quota.set_quota("c", 10))
        await asyncio.sleep(0.01)
        slow.gate.set()
        await asyncio.wait_for(asyncio.gather(w_b, w_a, both, change), timeout=10)


async def test_a_read_overlapping_a_delete_does_not_bring_it_back() -> None:
    fast, slow = MemoryAdapter(), SlowAdapter()
    async with Store([fast, slow], l1_capacity_bytes=1000) as store:
        k = key(1)
        await slow.put(k, b"old")
        await store.put(k, b"old")
        await fast.delete(k)
        store._l1 = type(store._l1)(1000) if store._l1 is not None else None  # cold L1
        slow.gate.clear()
        reader = asyncio.create_task(store.get(k))
        await asyncio.sleep(0.01)
        assert await store.delete(k) is True
        slow.gate.set()
        await reader
        assert await store.get(k) is None
        assert await fast.get(k) is None


async def test_a_cancelled_put_returns_after_its_write_and_is_accounted() -> None:
    slow = SlowAdapter()
    async with Store([slow], quotas={"alice": 100}) as store:
        slow.gate.clear()
        asyncio.get_running_loop().call_later(0.2, slow.gate.set)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.put(key(1), b"x" * 60), 0.05)
        # Back only once the write could finish (nothing reads the buffer any more), and
        # what it wrote is accounted.
        assert slow.gate.is_set()
        assert store.lru.usage("alice") == (60, 1)
        assert await stored(store) == {key(1): 60}
        await store.put(key(2), b"y" * 60)
        assert await stored(store) == {key(2): 60}


# -- put_each, listeners, touch, forgetting lost objects (what engine tiers use) ------------


async def test_put_each_fails_only_the_refused_items() -> None:
    store = Store([open_adapter("memory://")], quotas={"alice": 100, "bob": 10})
    async with store:
        out = await store.put_each(
            [(key(1, "alice"), b"a" * 40), (key(2, "bob"), b"b" * 50), (key(3, "alice"), b"c" * 40)]
        )
        assert out[0] is None and out[2] is None
        assert isinstance(out[1], QuotaExceededError)
        assert await store.get(key(1, "alice")) == b"a" * 40
        assert await store.get(key(2, "bob")) is None
        assert store.lru.usage("alice").nbytes == 80 and store.lru.usage("bob").nbytes == 0
        assert await store.put_each([]) == []


async def test_put_each_reports_keys_no_backend_took() -> None:
    down = FailingAdapter()
    async with Store([down], rebuild=False) as store:
        out = await store.put_each([(key(1), b"x"), (key(2), b"y")])
        assert all(isinstance(e, StorageError) for e in out)
        assert "no backend accepted" in str(out[0])
        assert store.lru.total_objects == 0
        down.down = False
        assert await store.put_each([(key(1), b"x")]) == [None]
        assert await store.get(key(1)) == b"x"


async def test_listeners_hear_evictions_deletes_and_lost_objects() -> None:
    backend = open_adapter("memory://")
    heard: list[tuple[str, list[ObjectKey]]] = []
    store = Store([backend], quotas={"alice": 20})
    store.add_listener(lambda event, keys: heard.append((event, list(keys))))

    def broken(event: str, keys: list[ObjectKey]) -> None:
        raise RuntimeError("a broken listener breaks nothing")

    store.add_listener(broken)
    async with store:
        await store.put(key(1), b"a" * 10)
        await store.put(key(2), b"b" * 10)
        await store.put(key(3), b"c" * 10)  # evicts key(1)
        assert heard == [("evicted", [key(1)])]
        await store.delete(key(2))
        assert heard[-1] == ("deleted", [key(2)])
        await store.delete(key(99))  # not stored: nothing to hear
        assert len(heard) == 2
        # the backend loses key(3) behind the store's back (a Redis restart)
        await backend.delete(key(3))
        assert await store.exists_many([key(3)]) == [False]
        await store.wait_idle()
        assert heard[-1] == ("missing", [key(3)])
        assert not store.lru.contains(key(3))


async def test_get_into_forgets_what_every_backend_lost() -> None:
    backend = open_adapter("memory://")
    async with Store([backend]) as store:
        await store.put(key(1), b"data")
        await backend.delete(key(1))
        assert await store.get_into(key(1), bytearray(8)) is None
        await store.wait_idle()
        assert not store.lru.contains(key(1))


async def test_a_backend_that_is_down_forgets_nothing() -> None:
    flaky = FailingAdapter()
    flaky.down = False
    async with Store([flaky]) as store:
        await store.put(key(1), b"data")
        flaky.down = True
        assert await store.get_into(key(1), bytearray(8)) is None
        assert await store.exists_many([key(1)]) == [False]
        await store.wait_idle()
        assert store.lru.contains(key(1))  # unknown, not lost: still accounted


async def test_touch_keeps_chunks_from_eviction() -> None:
    async with Store([open_adapter("memory://")], quotas={"alice": 20}) as store:
        await store.put(key(1), b"a" * 10)
        await store.put(key(2), b"b" * 10)
        store.touch([key(1), key(42)])
        await store.put(key(3), b"c" * 10)
        assert await store.exists_many([key(1), key(2), key(3)]) == [True, False, True]


async def test_a_backend_that_is_down_logs_a_line_per_interval_not_per_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = FailingAdapter()
    async with Store([down], rebuild=False) as store:
        with caplog.at_level("WARNING", logger="flexkv_store.store"):
            for i in range(50):
                assert await store.get(key(i)) is None
        lines = [r.getMessage() for r in caplog.records if "get failed" in r.getMessage()]
        assert len(lines) == 1  # the rest are counted into the next line
        assert store.metrics is not None
        assert store.metrics.backend_errors.labels("failing", "get", "storage")._value.get() == 50


async def test_put_each_over_quota_batch_reports_the_superseded_items() -> None:
    """Items evicted by later items of the same batch were never stored: put_each says so,
    and no "evicted" event is heard for them."""
    heard: list[tuple[str, list[ObjectKey]]] = []
    store = Store([open_adapter("memory://")], quotas={"alice": 20})
    store.add_listener(lambda event, keys: heard.append((event, list(keys))))
    async with store:
        await store.put(key(0), b"z" * 10)  # stored before: its eviction is real
        out = await store.put_each([(key(i), bytes([i]) * 10) for i in range(1, 5)])
        assert [o is None for o in out] == [False, False, True, True]
        assert all(isinstance(o, QuotaExceededError) for o in out[:2])
        assert "same batch" in str(out[0])
        assert heard == [("evicted", [key(0)])]
        assert await store.exists_many([key(i) for i in range(5)]) == [False] * 3 + [True] * 2


async def test_l1_copies_large_chunks_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large chunk's L1 copy is made by a worker thread, and is a copy."""
    import threading

    from flexkv_store import _bytes
    from flexkv_store import store as store_mod

    threads: list[str] = []
    real = _bytes.bytes_of

    def spy(view: memoryview) -> bytes:
        threads.append(threading.current_thread().name)
        return real(view)

    monkeypatch.setattr(store_mod, "bytes_of", spy)
    data = bytearray(os.urandom(2 << 20))
    async with Store([open_adapter("memory://")], l1_capacity_bytes=8 << 20) as store:
        await store.put(key(1), data)
        await store.put(key(2), b"small")
        original = bytes(data)
        data[:] = bytes(len(data))
        assert store._l1 is not None and store._l1.get(key(1)) == original
        assert store._l1.get(key(2)) == b"small"
        assert threads and all(n.startswith("flexkv-copies") for n in threads)
        assert len(threads) == 1  # the small chunk was copied on the loop
        # An L1 hit is copied out by a worker thread too.
        into: list[str] = []
        real_into = _bytes.copy_into

        def spy_into(dst: memoryview, src: object) -> None:
            into.append(threading.current_thread().name)
            real_into(dst, src)

        monkeypatch.setattr(store_mod, "copy_into", spy_into)
        out = bytearray(len(original))
        assert await store.get_into(key(1), out) == len(original) and out == original
        assert len(into) == 1 and into[0].startswith("flexkv-copies")
