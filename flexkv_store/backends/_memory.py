"""The memory adapter: a dict in this process. The reference implementation of the contract."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from flexkv_store._aio import settle
from flexkv_store._bytes import address_of, bytes_of, copy_into
from flexkv_store._freelist import FreeLists
from flexkv_store._threads import off_loop
from flexkv_store.backends.base import (
    Borrowed,
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


class _Slab:
    """A large payload in memory the adapter owns and reuses; never handed out.

    ``readers`` counts copies out of it in flight; a slab that was deleted or overwritten
    meanwhile (``dropped``) is reused only once the last of them is done.
    """

    __slots__ = ("arr", "dropped", "readers")

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.readers = 0
        self.dropped = False

    def __len__(self) -> int:
        return int(self.arr.nbytes)

    @property
    def view(self) -> memoryview:
        return memoryview(self.arr.data)


class MemoryAdapter(L2Adapter):
    """Objects held in a dict; ``capacity_bytes`` bounds the payload total.

    Payloads are copied on ``put`` (the caller may reuse its buffer at once). Small ones
    are kept as ``bytes`` and returned by ``get`` without a copy. Payloads of
    ``copy_off_loop_bytes`` or more live in memory the adapter reuses (up to
    ``recycle_bytes`` of freed payloads are kept for later puts of the same size), since
    faulting in fresh pages costs several times the copy itself; their copies in and out
    run in worker threads without the GIL, so a big object never stalls the event loop.
    Single event-loop use: each method changes the dict without awaiting once its copy is
    done, so each operation is atomic, and a read in flight keeps the value it started
    with even if the key is overwritten meanwhile.
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
        self._data: dict[ObjectKey, tuple[bytes | _Slab, float]] = {}
        self._bytes = 0
        # Freed large payloads, kept for later puts of the same size.
        limit = self.config.recycle_bytes
        if self.config.capacity_bytes is not None:
            limit = min(limit, self.config.capacity_bytes)
        self._free: FreeLists[np.ndarray] = FreeLists(limit)
        # Lent and not yet adopted or handed back, by address: the array and the very
        # view handed out (unlend matches that object, not just an address that a later
        # lend of the same memory may share).
        self._lent: dict[int, tuple[np.ndarray, memoryview]] = {}

    # -- reusable memory ----------------------------------------------------------------

    def _take(self, n: int) -> np.ndarray:
        arr = self._free.take(n)
        # Fresh pages are mapped when the copy touches them.
        return arr if arr is not None else np.empty(n, dtype=np.uint8)

    def _give_back(self, arr: np.ndarray) -> None:
        self._free.give(int(arr.nbytes), arr)

    def _drop(self, payload: bytes | _Slab) -> None:
        """A payload left the dict: reuse its memory once no copy reads it."""
        if isinstance(payload, _Slab):
            payload.dropped = True
            if not payload.readers:
                self._give_back(payload.arr)

    async def _read_slab(self, slab: _Slab, fn: Any, *args: Any) -> Any:
        slab.readers += 1
        try:
            return await settle(off_loop(fn, *args))
        finally:
            self._unread(slab)

    def lend(self, nbytes: int) -> memoryview | None:
        # docstring inherited
        if nbytes < self.copy_off_loop_bytes:
            return None  # small payloads are kept as bytes
        arr = self._take(nbytes)
        view = memoryview(arr.data)
        self._lent[int(arr.ctypes.data)] = (arr, view)
        return view

    def unlend(self, buf: memoryview) -> None:
        # docstring inherited
        addr = address_of(buf) if buf.nbytes else 0
        entry = self._lent.get(addr)
        if entry is not None and entry[1] is buf:  # still lent to this caller
            del self._lent[addr]
            self._give_back(entry[0])

    def borrow(self, key: ObjectKey) -> Borrowed | None:
        # docstring inherited
        check_key(key)
        if type(self).get_into is not MemoryAdapter.get_into:
            return None  # a subclass that reads differently must be asked through get_into
        entry = self._data.get(key)
        if entry is None or isinstance(entry[0], bytes):
            return None  # small payloads: get_into copies them in microseconds
        slab = entry[0]
        slab.readers += 1
        return Borrowed(slab.view, lambda: self._unread(slab))

    def _unread(self, slab: _Slab) -> None:
        slab.readers -= 1
        if slab.dropped and not slab.readers:
            self._give_back(slab.arr)

    def _adopt(self, view: memoryview) -> np.ndarray | None:
        """The lent array ``view`` is exactly, taken over; None if it is not one."""
        if not self._lent or not view.nbytes:
            return None
        addr = address_of(view)
        entry = self._lent.get(addr)
        if entry is None or entry[0].nbytes != view.nbytes:
            return None
        del self._lent[addr]
        return entry[0]

    # -- the contract ----------------------------------------------------------------------

    async def put(self, key: ObjectKey, data: Buffer) -> None:
        # docstring inherited
        check_key(key)
        view = as_bytes_view(data)
        n = view.nbytes
        payload: bytes | _Slab
        adopted = self._adopt(view) if n >= self.copy_off_loop_bytes else None
        if adopted is not None:
            payload = _Slab(adopted)  # filled by the caller in place: no copy
        elif n >= self.copy_off_loop_bytes:
            arr = self._take(n)
            try:
                # settle: the thread reads the caller's buffer until the copy is done.
                await settle(off_loop(copy_into, memoryview(arr.data), view))
            except BaseException:
                self._give_back(arr)
                raise
            payload = _Slab(arr)
        else:
            payload = bytes(view)
        old = self._data.get(key)
        new_total = self._bytes + n - (len(old[0]) if old else 0)
        cap = self.config.capacity_bytes
        if cap is not None and new_total > cap:
            self._drop(payload)
            raise StorageError(
                f"memory adapter full: {new_total} bytes would exceed capacity_bytes={cap}"
            )
        self._data[key] = (payload, time.time())
        self._bytes = new_total
        if old is not None:
            self._drop(old[0])

    async def get(self, key: ObjectKey) -> bytes | None:
        # docstring inherited
        check_key(key)
        entry = self._data.get(key)
        if entry is None:
            return None
        payload = entry[0]
        if isinstance(payload, bytes):
            return payload
        out: bytes = await self._read_slab(payload, bytes_of, payload.view)
        return out

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        # docstring inherited
        check_key(key)
        view = writable_view(out)
        entry = self._data.get(key)
        if entry is None:
            return None
        payload = entry[0]
        n = len(payload)
        if n > view.nbytes:
            raise BufferTooSmallError(n, view.nbytes)
        if isinstance(payload, bytes):
            view[:n] = payload
        else:
            await self._read_slab(payload, copy_into, view, payload.view)
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
        self._drop(entry[0])
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
            "recycled_bytes": self._free.bytes,
        }
