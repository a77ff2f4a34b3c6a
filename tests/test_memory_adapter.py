"""The memory adapter passes the conformance suite."""

from __future__ import annotations

import time

import pytest

from flexkv_store.backends import L2Adapter, MemoryConfig, open_adapter
from flexkv_store.backends._memory import MemoryAdapter
from flexkv_store.backends.testing import AdapterFactory, AdapterTests
from flexkv_store.errors import StorageError
from flexkv_store.keyformat import ObjectKey


class TestMemoryAdapter(AdapterTests):
    @pytest.fixture
    def adapter_factory(self) -> AdapterFactory:
        async def make() -> L2Adapter:
            return open_adapter("memory://")

        return make

    async def backdoor_read(self, adapter: L2Adapter, key: ObjectKey) -> bytes | None:
        assert isinstance(adapter, MemoryAdapter)
        entry = adapter._data.get(key)
        if entry is None:
            return None
        payload = entry[0]
        return payload if isinstance(payload, bytes) else bytes(payload.view)

    async def backdoor_write(self, adapter: L2Adapter, key: ObjectKey, raw: bytes) -> None:
        assert isinstance(adapter, MemoryAdapter)
        adapter._data[key] = (raw, time.time())


async def test_capacity_is_enforced() -> None:
    a = MemoryAdapter(MemoryConfig(capacity_bytes=10))
    k1, k2 = ObjectKey("m", 0, b"\x01"), ObjectKey("m", 0, b"\x02")
    await a.put(k1, b"12345678")
    with pytest.raises(StorageError, match="capacity_bytes=10"):
        await a.put(k2, b"123")
    assert await a.get(k2) is None
    await a.put(k1, b"1234567890")  # an overwrite counts the difference
    assert a.total_bytes == 10
    assert a.info()["objects"] == 1


MIB = 1 << 20


def _big(fill: int, n: int = 2 * MIB) -> bytes:
    return bytes([fill]) * n


async def test_large_payloads_reuse_freed_memory_within_recycle_bytes() -> None:
    a = MemoryAdapter(MemoryConfig(recycle_bytes=3 * MIB))
    k = [ObjectKey("m", 0, bytes([i])) for i in range(4)]
    await a.put(k[0], _big(1))
    await a.put(k[1], _big(2))
    slab0 = a._data[k[0]][0]
    assert not isinstance(slab0, bytes)
    arr0 = slab0.arr
    assert await a.delete(k[0])
    assert a.info()["recycled_bytes"] == 2 * MIB
    await a.put(k[2], _big(3))  # same size: the freed memory, overwritten
    slab2 = a._data[k[2]][0]
    assert not isinstance(slab2, bytes) and slab2.arr is arr0
    assert a.info()["recycled_bytes"] == 0
    assert await a.get(k[2]) == _big(3) and await a.get(k[1]) == _big(2)
    await a.delete(k[1])
    await a.delete(k[2])  # 4 MiB freed, 3 MiB kept at most
    assert a.info()["recycled_bytes"] == 2 * MIB
    await a.put(k[3], b"small")  # small payloads stay bytes, shared on get
    assert a._data[k[3]][0] is await a.get(k[3])


async def test_recycling_is_off_with_zero_and_bounded_by_capacity() -> None:
    off = MemoryAdapter(MemoryConfig(recycle_bytes=0))
    key = ObjectKey("m", 0, b"\x01")
    await off.put(key, _big(1))
    await off.delete(key)
    assert off.info()["recycled_bytes"] == 0
    small = MemoryAdapter(MemoryConfig(capacity_bytes=MIB + 10))
    await small.put(key, _big(1, MIB + 10))
    with pytest.raises(StorageError):  # over capacity: the copy's memory is kept, not lost
        await small.put(ObjectKey("m", 0, b"\x02"), _big(2, MIB))
    assert small.info()["recycled_bytes"] == MIB
    assert await small.get(key) == _big(1, MIB + 10)


async def test_a_read_in_flight_keeps_its_value_when_the_key_is_overwritten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The freed memory of an overwritten payload is not reused while a copy reads it."""
    import asyncio
    import threading

    from flexkv_store import _bytes
    from flexkv_store.backends import _memory

    a = MemoryAdapter()
    k1, k2 = ObjectKey("m", 0, b"\x01"), ObjectKey("m", 0, b"\x02")
    await a.put(k1, _big(1))
    gate, entered = threading.Event(), threading.Event()
    real = _bytes.copy_into

    def gated(dst: memoryview, src: object) -> None:
        entered.set()
        assert gate.wait(10)
        real(dst, src)

    monkeypatch.setattr(_memory, "copy_into", gated)
    out = bytearray(2 * MIB)
    reader = asyncio.ensure_future(a.get_into(k1, out))
    await asyncio.to_thread(entered.wait, 10)
    monkeypatch.setattr(_memory, "copy_into", real)
    await a.put(k1, _big(7))  # the old payload is dropped while the read holds it
    await a.put(k2, _big(9))  # same size: must not take the memory being read
    gate.set()
    assert await reader == 2 * MIB
    assert bytes(out) == _big(1)
    assert await a.get(k1) == _big(7) and await a.get(k2) == _big(9)
    assert a.info()["recycled_bytes"] == 2 * MIB  # handed back once the read was done


async def test_a_cancelled_put_stores_nothing_and_keeps_the_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled mid-copy, a put returns only once the copy is done (the caller may then
    reuse its buffer), stores nothing, and keeps the memory for reuse."""
    import asyncio
    import threading

    from flexkv_store import _bytes
    from flexkv_store.backends import _memory

    gate, entered = threading.Event(), threading.Event()

    def gated(dst: memoryview, src: object) -> None:
        entered.set()
        assert gate.wait(10)
        _bytes.copy_into(dst, src)

    monkeypatch.setattr(_memory, "copy_into", gated)
    a = MemoryAdapter()
    key = ObjectKey("m", 0, b"\x01")
    task = asyncio.ensure_future(a.put(key, _big(1, 4 * MIB)))
    await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still copying from the caller's buffer
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await a.get(key) is None and a.total_bytes == 0
    assert a.info()["recycled_bytes"] == 4 * MIB


async def test_lent_memory_is_adopted_by_a_put_of_exactly_it() -> None:
    from flexkv_store._bytes import address_of

    a = MemoryAdapter()
    assert a.lend(MIB - 1) is None  # small payloads are kept as bytes: nothing to lend
    k1, k2, k3 = (ObjectKey("m", 0, bytes([i])) for i in (1, 2, 3))
    buf = a.lend(2 * MIB)
    assert buf is not None and not buf.readonly
    buf[:] = _big(5)
    await a.put(k1, buf)
    slab = a._data[k1][0]
    assert not isinstance(slab, bytes) and int(slab.arr.ctypes.data) == address_of(buf)
    a.unlend(buf)  # adopted: a no-op
    assert a.info()["recycled_bytes"] == 0 and await a.get(k1) == _big(5)
    other = a.lend(2 * MIB)
    assert other is not None
    other[:] = _big(6)
    await a.put(k2, other[: MIB + 1])  # not exactly the lent buffer: copied, not adopted
    assert await a.get(k2) == _big(6, MIB + 1)
    a.unlend(other)  # never adopted: kept for reuse
    assert a.info()["recycled_bytes"] == 2 * MIB
    full = MemoryAdapter(MemoryConfig(capacity_bytes=3 * MIB))
    await full.put(k1, _big(1))
    lent = full.lend(2 * MIB)
    assert lent is not None
    with pytest.raises(StorageError):
        await full.put(k3, lent)  # refused after adoption: the memory is kept, not lost
    full.unlend(lent)
    assert full.info()["recycled_bytes"] == 2 * MIB and await full.get(k3) is None


async def test_a_borrowed_payload_outlives_an_overwrite() -> None:
    a = MemoryAdapter()
    k1, k2 = ObjectKey("m", 0, b"\x01"), ObjectKey("m", 0, b"\x02")
    await a.put(k1, b"small")
    assert a.borrow(k1) is None and a.borrow(k2) is None  # small or absent: use get_into
    await a.put(k1, _big(1))
    lease = a.borrow(k1)
    assert lease is not None and bytes(lease.view) == _big(1)
    await a.put(k1, _big(2))  # overwritten while lent
    await a.put(k2, _big(3))  # same size: must not reuse the lent memory
    assert bytes(lease.view) == _big(1)
    assert a.info()["recycled_bytes"] == 0
    lease.release()
    lease.release()  # idempotent
    assert a.info()["recycled_bytes"] == 2 * MIB
    assert await a.get(k1) == _big(2) and await a.get(k2) == _big(3)


async def test_unlend_after_a_refused_put_leaves_a_later_lend_alone() -> None:
    """A refused put of lent memory gives it back; the caller's unlend must then not hand
    back a later caller's lend of that same memory (two owners of one buffer)."""
    a = MemoryAdapter(MemoryConfig(capacity_bytes=3 * MIB))
    k1, k2 = ObjectKey("m", 0, b"\x01"), ObjectKey("m", 0, b"\x02")
    await a.put(k1, _big(1))
    first = a.lend(2 * MIB)
    assert first is not None
    with pytest.raises(StorageError):
        await a.put(k2, first)  # over capacity: adopted, then given back
    second = a.lend(2 * MIB)  # the same memory, lent again
    assert second is not None
    a.unlend(first)  # late: must not free `second`
    third = a.lend(2 * MIB)
    assert third is not None
    from flexkv_store._bytes import address_of

    assert address_of(third) != address_of(second)
    await a.delete(k1)
    second[:] = _big(2)
    third[:] = _big(3)
    await a.put(k2, second)
    assert await a.get(k2) == _big(2)
