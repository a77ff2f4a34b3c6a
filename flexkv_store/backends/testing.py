"""The conformance suite every adapter passes: subclass :class:`AdapterTests`.

A backend's test module is a short subclass that says how to open a fresh, empty adapter
and how to read and write the backend directly ("backdoor" helpers that bypass the
adapter under test)::

    class TestMyAdapter(AdapterTests):
        @pytest.fixture
        def adapter_factory(self, tmp_path):
            counter = itertools.count()
            async def make():
                return MyAdapter(MyConfig(root=str(tmp_path / str(next(counter)))))
            return make

        async def backdoor_read(self, adapter, key):
            ...  # the raw stored bytes (header + payload), or None

        async def backdoor_write(self, adapter, key, raw):
            ...  # store raw bytes under the key's backend name

The factory may be called several times in one test (the hypothesis state machine runs on
its own event loop and opens one adapter per example), so each call must give an empty
adapter: a new directory, key prefix or bucket prefix. Tests skip only on a declared
capability (``capabilities.verifies_checksums`` for the corruption tests), never because a
server is missing: fixtures that start servers fail under ``CI=true``.

This module needs pytest and hypothesis (the ``test`` extra); the library never imports it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    rule,
    run_state_machine_as_test,
)

from flexkv_store.backends.base import L2Adapter, ObjectInfo
from flexkv_store.errors import BufferTooSmallError
from flexkv_store.keyformat import ObjectKey

__all__ = [
    "AdapterFactory",
    "AdapterTests",
    "object_keys",
    "payloads",
]

AdapterFactory = Callable[[], Awaitable[L2Adapter]]

MIB = 1 << 20
#: Sizes every adapter must round-trip: empty, tiny, around the 4 KiB alignment, odd MiB.
ROUND_TRIP_SIZES = [0, 1, 7, 4095, 4096, 4097, 65536 + 3, MIB + 17]


def object_keys(
    model_names: st.SearchStrategy[str] | None = None,
    salts: st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[ObjectKey]:
    """Valid keys; by default a small pool, so that collisions (overwrites) happen."""
    return st.builds(
        ObjectKey,
        model_names if model_names is not None else st.sampled_from(["m", "org/model-1.5"]),
        st.integers(0, 3),
        st.binary(min_size=1, max_size=4),
        salts if salts is not None else st.sampled_from(["", "alice", "bob"]),
    )


def payloads(max_size: int = 20000) -> st.SearchStrategy[bytes]:
    """Payloads from empty to ``max_size`` bytes."""
    return st.binary(min_size=0, max_size=max_size)


def _pattern(n: int, seed: int) -> bytes:
    """Deterministic non-repeating bytes, so a shifted or torn read never matches."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _key(i: int = 0, *, model: str = "test/model", salt: str = "", rank: int = 0) -> ObjectKey:
    return ObjectKey(model, rank, i.to_bytes(8, "big"), salt)


async def _collect(it: AsyncIterator[ObjectInfo]) -> list[ObjectInfo]:
    return [info async for info in it]


class AdapterTests:
    """The L2 adapter contract as tests. Subclass it; see the module docstring."""

    # -- what a subclass provides ------------------------------------------------------

    @pytest.fixture
    def adapter_factory(self) -> AdapterFactory:
        """An async callable that opens a fresh, empty adapter on each call."""
        raise NotImplementedError("subclasses provide the adapter_factory fixture")

    async def backdoor_read(self, adapter: L2Adapter, key: ObjectKey) -> bytes | None:
        """The raw stored bytes of ``key`` (header included), bypassing the adapter."""
        raise NotImplementedError

    async def backdoor_write(self, adapter: L2Adapter, key: ObjectKey, raw: bytes) -> None:
        """Store ``raw`` as the stored form of ``key``, bypassing the adapter."""
        raise NotImplementedError

    # -- fixtures ----------------------------------------------------------------------

    @pytest.fixture
    async def adapter(self, adapter_factory: AdapterFactory) -> AsyncIterator[L2Adapter]:
        a = await adapter_factory()
        try:
            yield a
        finally:
            await a.aclose()

    # -- round trips -------------------------------------------------------------------

    @pytest.mark.parametrize("size", ROUND_TRIP_SIZES)
    async def test_round_trip_sizes(self, adapter: L2Adapter, size: int) -> None:
        data = _pattern(size, size)
        key = _key(size)
        await adapter.put(key, data)
        got = await adapter.get(key)
        assert got is not None
        assert bytes(got) == data
        assert await adapter.size(key) == size
        assert await adapter.exists(key)

    async def test_round_trip_64_mib(self, adapter: L2Adapter) -> None:
        data = _pattern(64 * MIB + 5, 64)
        key = _key(64)
        await adapter.put(key, data)
        assert await adapter.size(key) == len(data)
        got = await adapter.get(key)
        assert got is not None and len(got) == len(data)
        assert bytes(got) == data

    @pytest.mark.parametrize(
        "kind", ["bytes", "bytearray", "memoryview", "numpy_u8", "numpy_f32_2d", "torch"]
    )
    async def test_buffer_kinds(self, adapter: L2Adapter, kind: str) -> None:
        raw = _pattern(3 * 4096 + 16, 3)
        arr = np.frombuffer(raw, dtype=np.uint8).copy()
        data: Any
        if kind == "bytes":
            data = raw
        elif kind == "bytearray":
            data = bytearray(raw)
        elif kind == "memoryview":
            data = memoryview(bytearray(raw))[0:]
        elif kind == "numpy_u8":
            data = arr
        elif kind == "numpy_f32_2d":
            data = arr.view(np.float32).reshape(-1, 4)
        else:
            torch = pytest.importorskip("torch")
            data = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(-1, 2)
        key = _key(1, salt="kinds")
        await adapter.put(key, data)
        assert await adapter.get(key) == raw

    async def test_put_does_not_keep_the_callers_buffer(self, adapter: L2Adapter) -> None:
        buf = bytearray(b"a" * 5000)
        key = _key(2)
        await adapter.put(key, buf)
        buf[:] = b"b" * 5000
        assert await adapter.get(key) == b"a" * 5000

    # -- misses ------------------------------------------------------------------------

    async def test_misses_are_not_errors(self, adapter: L2Adapter) -> None:
        key = _key(404)
        assert await adapter.get(key) is None
        assert await adapter.size(key) is None
        assert await adapter.exists(key) is False
        assert await adapter.delete(key) is False
        assert await adapter.get_into(key, bytearray(16)) is None
        assert await adapter.get_many([key, _key(405)]) == [None, None]
        assert await adapter.exists_many([key]) == [False]
        assert await adapter.delete_many([key]) == [False]

    async def test_rejects_non_keys(self, adapter: L2Adapter) -> None:
        with pytest.raises(TypeError):
            await adapter.put("m@00000000@00", b"x")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await adapter.get("m@00000000@00")  # type: ignore[arg-type]

    async def test_rejects_non_buffers(self, adapter: L2Adapter) -> None:
        key = _key(3)
        with pytest.raises(TypeError):
            await adapter.put(key, "text is not bytes")
        with pytest.raises(TypeError):
            await adapter.put(key, 12345)
        assert await adapter.get(key) is None

    # -- overwrite and delete ----------------------------------------------------------

    async def test_overwrite(self, adapter: L2Adapter) -> None:
        key = _key(5)
        await adapter.put(key, b"first version, longer than the second")
        await adapter.put(key, b"second")
        assert await adapter.get(key) == b"second"
        assert await adapter.size(key) == 6
        infos = [i for i in await _collect(adapter.scan()) if i.key == key]
        assert len(infos) == 1 and infos[0].size == 6

    async def test_delete(self, adapter: L2Adapter) -> None:
        key, other = _key(6), _key(7)
        await adapter.put(key, b"x" * 100)
        await adapter.put(other, b"y" * 100)
        assert await adapter.delete(key) is True
        assert await adapter.get(key) is None
        assert await adapter.exists(key) is False
        assert await adapter.delete(key) is False
        assert await adapter.get(other) == b"y" * 100

    async def test_salts_are_isolated(self, adapter: L2Adapter) -> None:
        plain, alice, bob = (_key(8, salt=s) for s in ("", "alice", "bob"))
        for k, v in ((plain, b"plain"), (alice, b"alice"), (bob, b"bob")):
            await adapter.put(k, v)
        assert await adapter.get_many([plain, alice, bob]) == [b"plain", b"alice", b"bob"]
        await adapter.delete(alice)
        assert await adapter.get_many([plain, alice, bob]) == [b"plain", None, b"bob"]

    async def test_models_and_ranks_are_isolated(self, adapter: L2Adapter) -> None:
        a = _key(9, model="org/a")
        b = _key(9, model="org-a")
        c = _key(9, model="org/a", rank=1)
        for k in (a, b, c):
            await adapter.put(k, k.to_wire().encode())
        for k in (a, b, c):
            assert await adapter.get(k) == k.to_wire().encode()

    async def test_unusual_keys(self, adapter: L2Adapter) -> None:
        keys = [
            ObjectKey("Qwen/Qwen3-0.6B", 0xFFFFFFFF, b"\xab" * 64, "ü-salt"),
            ObjectKey("modèle/日本語", 1, b"\x00", "tenant A.user-1:42"),
            ObjectKey("x/" * 200 + "m", 3, b"\xcd" * 64, "s" * 128),  # overlong filename
            ObjectKey("m" * 512, 0, b"\xab" * 64, ".."),
        ]
        for i, k in enumerate(keys):
            await adapter.put(k, bytes([i]) * (i + 1))
        for i, k in enumerate(keys):
            assert await adapter.get(k) == bytes([i]) * (i + 1)
            assert await adapter.size(k) == i + 1
        found = {info.key: info.size for info in await _collect(adapter.scan())}
        for i, k in enumerate(keys):
            assert found.get(k) == i + 1

    # -- get_into ----------------------------------------------------------------------

    async def test_get_into(self, adapter: L2Adapter) -> None:
        data = _pattern(10000, 10)
        key = _key(10)
        await adapter.put(key, data)
        exact = bytearray(10000)
        assert await adapter.get_into(key, exact) == 10000
        assert bytes(exact) == data
        bigger = np.full(20000, 0xEE, dtype=np.uint8)
        assert await adapter.get_into(key, bigger) == 10000
        assert bigger[:10000].tobytes() == data
        assert (bigger[10000:] == 0xEE).all(), "bytes past the object must stay untouched"

    async def test_lend_and_borrow_when_offered(self, adapter: L2Adapter) -> None:
        """Optional zero-copy paths: lent memory filled and put is stored (and nothing
        else); a borrowed payload is the stored one; either may be declined (None)."""
        n = 2 * MIB + 3
        data = _pattern(n, 77)
        key = _key(77)
        lent = adapter.lend(n)
        if lent is not None:
            assert lent.nbytes == n and not lent.readonly
            lent[:] = data
            await adapter.put(key, lent)
            adapter.unlend(lent)
        else:
            await adapter.put(key, data)
        got = await adapter.get(key)
        assert got is not None and bytes(got) == data
        spare = adapter.lend(n)
        if spare is not None:
            adapter.unlend(spare)  # never put: handed back, stores nothing
            assert [i.key async for i in adapter.scan()] == [key]
            assert bytes(await adapter.get(key) or b"") == data
        lease = adapter.borrow(key)
        if lease is not None:
            try:
                assert bytes(lease.view) == data
            finally:
                lease.release()
        assert adapter.borrow(_key(79)) is None  # absent

    async def test_get_into_torch(self, adapter: L2Adapter) -> None:
        torch = pytest.importorskip("torch")
        data = _pattern(8192, 11)
        key = _key(11)
        await adapter.put(key, data)
        out = torch.empty(4096, dtype=torch.float16)
        assert await adapter.get_into(key, out) == 8192
        assert out.view(torch.uint8).numpy().tobytes() == data

    async def test_get_into_too_small(self, adapter: L2Adapter) -> None:
        key = _key(12)
        await adapter.put(key, b"z" * 5000)
        small = bytearray(b"\x01" * 4999)
        with pytest.raises(BufferTooSmallError) as info:
            await adapter.get_into(key, small)
        assert info.value.needed == 5000
        assert small == bytearray(b"\x01" * 4999), "a failed get_into must not write"

    async def test_get_into_read_only_buffer(self, adapter: L2Adapter) -> None:
        key = _key(13)
        await adapter.put(key, b"abc")
        with pytest.raises(TypeError):
            await adapter.get_into(key, b"\x00" * 10)

    # -- batches -----------------------------------------------------------------------

    async def test_batches(self, adapter: L2Adapter) -> None:
        keys = [_key(100 + i, salt="batch" if i % 2 else "") for i in range(12)]
        datas = [_pattern(i * 1000 + (i % 3), i) for i in range(12)]
        await adapter.put_many(zip(keys, datas, strict=True))
        missing = _key(999)
        got = await adapter.get_many([*keys[:6], missing, *keys[6:]])
        assert got == [*datas[:6], None, *datas[6:]]
        assert await adapter.exists_many([missing, keys[0], keys[11]]) == [False, True, True]
        assert await adapter.delete_many([keys[0], missing, keys[1]]) == [True, False, True]
        assert await adapter.get_many(keys[:3]) == [None, None, datas[2]]

    async def test_batch_of_one_and_empty(self, adapter: L2Adapter) -> None:
        await adapter.put_many([])
        assert await adapter.get_many([]) == []
        key = _key(150)
        await adapter.put_many([(key, b"one")])
        assert await adapter.get_many([key]) == [b"one"]

    async def test_batch_with_repeated_key(self, adapter: L2Adapter) -> None:
        key = _key(160)
        await adapter.put(key, b"v")
        assert await adapter.get_many([key, key]) == [b"v", b"v"]

    # -- scan --------------------------------------------------------------------------

    async def test_scan(self, adapter: L2Adapter) -> None:
        if not adapter.capabilities.listing:
            pytest.skip("adapter declares no listing")
        before = time.time() - 5
        stored = {
            _key(200, model="org/a"): 10,
            _key(201, model="org/a", salt="alice"): 20,
            _key(202, model="b", salt="alice"): 30,
            _key(203, model="b"): 0,
        }
        for k, n in stored.items():
            await adapter.put(k, b"q" * n)
        infos = await _collect(adapter.scan())
        assert {i.key: i.size for i in infos} == stored
        for i in infos:
            assert before <= i.last_modified <= time.time() + 5
        by_model = await _collect(adapter.scan(model_name="org/a"))
        assert {i.key for i in by_model} == {k for k in stored if k.model_name == "org/a"}
        by_salt = await _collect(adapter.scan(cache_salt="alice"))
        assert {i.key for i in by_salt} == {k for k in stored if k.cache_salt == "alice"}
        unsalted = await _collect(adapter.scan(cache_salt=""))
        assert {i.key for i in unsalted} == {k for k in stored if k.cache_salt == ""}
        both = await _collect(adapter.scan(model_name="b", cache_salt="alice"))
        assert [i.key for i in both] == [_key(202, model="b", salt="alice")]

    async def test_scan_after_delete(self, adapter: L2Adapter) -> None:
        keys = [_key(300 + i) for i in range(5)]
        for k in keys:
            await adapter.put(k, b"x")
        await adapter.delete(keys[2])
        assert {i.key for i in await _collect(adapter.scan())} == set(keys) - {keys[2]}

    # -- atomicity ---------------------------------------------------------------------

    async def test_concurrent_writers_of_one_key(self, adapter: L2Adapter) -> None:
        key = _key(400)
        versions = [_pattern(200_000 + 4096 * i + i, 400 + i) for i in range(8)]
        seen: list[bytes | None] = []
        done = asyncio.Event()

        async def reader() -> None:
            while not done.is_set():
                seen.append(await adapter.get(key))
                await asyncio.sleep(0)

        async def writer(i: int) -> None:
            for _ in range(3):
                await adapter.put(key, versions[i])

        readers = [asyncio.create_task(reader()) for _ in range(2)]
        try:
            await asyncio.gather(*(writer(i) for i in range(len(versions))))
        finally:
            done.set()
            await asyncio.gather(*readers)
        allowed = set(versions)
        for got in seen:
            assert got is None or bytes(got) in allowed, "a reader saw a torn object"
        final = await adapter.get(key)
        assert final is not None and bytes(final) in allowed
        assert await adapter.size(key) == len(final)

    # -- corruption --------------------------------------------------------------------

    def _require_checksums(self, adapter: L2Adapter) -> None:
        if not adapter.capabilities.verifies_checksums:
            pytest.skip("adapter declares verifies_checksums=False")

    async def _stored(self, adapter: L2Adapter, key: ObjectKey, data: bytes) -> bytes:
        await adapter.put(key, data)
        raw = await self.backdoor_read(adapter, key)
        assert raw is not None, "backdoor_read found nothing after a put"
        return raw

    @pytest.mark.parametrize("where", ["payload_last", "payload_first", "header"])
    async def test_flipped_byte_is_a_miss(self, adapter: L2Adapter, where: str) -> None:
        self._require_checksums(adapter)
        data = _pattern(9000, 500)
        key = _key(500, salt=where)
        raw = bytearray(await self._stored(adapter, key, data))
        pos = {"payload_last": len(raw) - 1, "payload_first": len(raw) - len(data), "header": 5}
        raw[pos[where]] ^= 0x01
        await self.backdoor_write(adapter, key, bytes(raw))
        assert await adapter.get(key) is None
        assert await adapter.get_into(key, bytearray(len(data))) is None
        assert await adapter.get_many([key]) == [None]

    async def test_truncated_object_is_a_miss(self, adapter: L2Adapter) -> None:
        self._require_checksums(adapter)
        data = _pattern(9000, 501)
        key = _key(501)
        raw = await self._stored(adapter, key, data)
        await self.backdoor_write(adapter, key, raw[:-1])
        assert await adapter.get(key) is None
        await self.backdoor_write(adapter, key, raw[:10])
        assert await adapter.get(key) is None

    async def test_object_of_another_key_is_a_miss(self, adapter: L2Adapter) -> None:
        self._require_checksums(adapter)
        a, b = _key(502), _key(503)
        raw_a = await self._stored(adapter, a, b"payload of a")
        await adapter.put(b, b"payload of b")
        await self.backdoor_write(adapter, b, raw_a)
        assert await adapter.get(b) is None, "an object must carry and check its own key"

    # -- lifecycle ---------------------------------------------------------------------

    async def test_aclose_is_idempotent(self, adapter_factory: AdapterFactory) -> None:
        async with await adapter_factory() as a:
            await a.put(_key(600), b"x")
        await a.aclose()

    async def test_info(self, adapter: L2Adapter) -> None:
        info = adapter.info()
        assert info["adapter"] == adapter.name
        text = repr(info).lower()
        assert "secret" not in text or "**" in text

    # -- the state machine -------------------------------------------------------------

    def test_state_machine(self, adapter_factory: AdapterFactory) -> None:
        """Random sequences of operations agree with a dict."""
        loop = asyncio.new_event_loop()
        try:
            machine = _make_machine(adapter_factory, loop)
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=12,
                    stateful_step_count=15,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                ),
            )
        finally:
            loop.close()


def _make_machine(
    factory: AdapterFactory, loop: asyncio.AbstractEventLoop
) -> type[RuleBasedStateMachine]:
    class AdapterMachine(RuleBasedStateMachine):
        """The adapter against a dict model."""

        keys = Bundle("keys")

        def __init__(self) -> None:
            super().__init__()
            self.adapter = loop.run_until_complete(factory())
            self.model: dict[ObjectKey, bytes] = {}

        def run(self, coro: Awaitable[Any]) -> Any:
            return loop.run_until_complete(coro)

        @rule(target=keys, key=object_keys())
        def new_key(self, key: ObjectKey) -> ObjectKey:
            return key

        @rule(key=keys, data=payloads())
        def put(self, key: ObjectKey, data: bytes) -> None:
            self.run(self.adapter.put(key, data))
            self.model[key] = data

        @rule(key=keys)
        def get(self, key: ObjectKey) -> None:
            assert self.run(self.adapter.get(key)) == self.model.get(key)

        @rule(key=keys)
        def size(self, key: ObjectKey) -> None:
            expected = len(self.model[key]) if key in self.model else None
            assert self.run(self.adapter.size(key)) == expected

        @rule(key=keys)
        def delete(self, key: ObjectKey) -> None:
            assert self.run(self.adapter.delete(key)) == (key in self.model)
            self.model.pop(key, None)

        @rule(items=st.lists(st.tuples(keys, payloads(3000)), max_size=4))
        def put_many(self, items: list[tuple[ObjectKey, bytes]]) -> None:
            # A batch with one key twice has no defined winner; keep keys distinct.
            distinct = dict(items)
            self.run(self.adapter.put_many(list(distinct.items())))
            self.model.update(distinct)

        @rule(ks=st.lists(keys, max_size=5))
        def get_many(self, ks: list[ObjectKey]) -> None:
            assert self.run(self.adapter.get_many(ks)) == [self.model.get(k) for k in ks]

        @rule(ks=st.lists(keys, max_size=5, unique=True))
        def delete_many(self, ks: list[ObjectKey]) -> None:
            assert self.run(self.adapter.delete_many(ks)) == [k in self.model for k in ks]
            for k in ks:
                self.model.pop(k, None)

        @rule(salt=st.sampled_from([None, "", "alice", "bob"]))
        def scan(self, salt: str | None) -> None:
            infos = self.run(_collect(self.adapter.scan(cache_salt=salt)))
            expected = {
                k: len(v) for k, v in self.model.items() if salt is None or k.cache_salt == salt
            }
            assert {i.key: i.size for i in infos} == expected

        def teardown(self) -> None:
            self.run(self.adapter.aclose())

    return AdapterMachine
