"""The memory adapter: a dict in this process. The reference implementation of the contract."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, ClassVar

from flexkv_store._aio import settle
from flexkv_store._bytes import bytes_of, copy_into
from flexkv_store.backends.base import (
    Buffer,
    Capabilities,
    L2Adapter,
    ObjectInfo,
    check_key,
    writable_view,
)
from flexkv_store.backends.config import MemoryConfig
from flexkv_store.errors import BufferTooSmallError, StorageError
from flexkv_store.keyformat import ObjectKey, as_bytes_view

__all__ = ["MemoryAdapter"]


class MemoryAdapter(L2Adapter):
    """Objects held as ``bytes`` in a dict; ``capacity_bytes`` bounds the payload total.

    Payloads are copied on ``put`` (the caller may reuse its buffer at once) and returned
    without a copy on ``get`` (``bytes`` are immutable). Copies of ``copy_off_loop_bytes``
    or more (``put``'s, ``get_into``'s) run in a worker thread, so a big object never stalls
    the event loop for the length of a memcpy. Single event-loop use: after its copy, every
    method changes the dict without awaiting, so each operation is atomic.
    """

    #: Copies at least this large leave the event loop (a 1 MiB memcpy takes ~0.1 ms).
    copy_off_loop_bytes: ClassVar[int] = 1 << 20

    name = "memory"
    # Payloads never leave process memory, so there is no framing and nothing to verify.
    capabilities: ClassVar[Capabilities] = Capabilities(
        listing=True, shared_across_processes=False, persistent=False, verifies_checksums=False
    )
    config_class = MemoryConfig

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self.config = config or MemoryConfig()
        self._data: dict[ObjectKey, tuple[bytes, float]] = {}
        self._bytes = 0

    async def put(self, key: ObjectKey, data: Buffer) -> None:
        # docstring inherited
        check_key(key)
        view = as_bytes_view(data)
        if view.nbytes >= self.copy_off_loop_bytes:
            # settle: the thread reads the caller's buffer until the copy is done.
            payload = await settle(asyncio.to_thread(bytes_of, view))
        else:
            payload = bytes(view)
        old = self._data.get(key)
        new_total = self._bytes + len(payload) - (len(old[0]) if old else 0)
        cap = self.config.capacity_bytes
        if cap is not None and new_total > cap:
            raise StorageError(
                f"memory adapter full: {new_total} bytes would exceed capacity_bytes={cap}"
            )
        self._data[key] = (payload, time.time())
        self._bytes = new_total

    async def get(self, key: ObjectKey) -> bytes | None:
        # docstring inherited
        check_key(key)
        entry = self._data.get(key)
        return entry[0] if entry else None

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        # docstring inherited
        check_key(key)
        view = writable_view(out)
        payload = await self.get(key)
        if payload is None:
            return None
        n = len(payload)
        if n > view.nbytes:
            raise BufferTooSmallError(n, view.nbytes)
        if n >= self.copy_off_loop_bytes:
            await settle(asyncio.to_thread(copy_into, view, payload))
        else:
            view[:n] = payload
        return n

    async def size(self, key: ObjectKey) -> int | None:
        # docstring inherited
        check_key(key)
        entry = self._data.get(key)
        return len(entry[0]) if entry else None

    async def delete(self, key: ObjectKey) -> bool:
        # docstring inherited
        check_key(key)
        entry = self._data.pop(key, None)
        if entry is None:
            return False
        self._bytes -= len(entry[0])
        return True

    async def put_each(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> list[Exception | None]:
        # docstring inherited
        results: list[Exception | None] = []
        for key, data in items:
            try:
                await self.put(key, data)
            except StorageError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    async def get_many(self, keys: Sequence[ObjectKey]) -> list[bytes | None]:
        # docstring inherited
        return [await self.get(k) for k in keys]

    async def scan(
        self, model_name: str | None = None, cache_salt: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        # docstring inherited
        for key, (payload, mtime) in list(self._data.items()):
            if model_name is not None and key.model_name != model_name:
                continue
            if cache_salt is not None and key.cache_salt != cache_salt:
                continue
            yield ObjectInfo(key, len(payload), mtime)

    @property
    def total_bytes(self) -> int:
        """Payload bytes held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def info(self) -> dict[str, Any]:
        # docstring inherited
        return {
            "adapter": self.name,
            "objects": len(self._data),
            "bytes": self._bytes,
            "capacity_bytes": self.config.capacity_bytes,
        }
