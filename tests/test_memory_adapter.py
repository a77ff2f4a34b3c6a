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
        return entry[0] if entry else None

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
