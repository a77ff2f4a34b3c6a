"""BufferPool: reusable (pinned) host buffers for chunks.

Allocating pinned memory costs far more than the copy it serves (page locking, a driver call),
and chunks of one engine mostly share a size, so buffers are kept and handed out again.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class BufferPool:
    """A bounded, thread-safe pool of host buffers for chunks.

    ``acquire(shape, dtype)`` returns a contiguous tensor backed by a reused ``uint8`` buffer
    (contents undefined); ``release`` hands it back, or use ``with pool.buffer(...)``. The bytes
    of all buffers held, in use or free, never exceed ``capacity_bytes``: free buffers are
    dropped to make room, and when the buffers in use leave too little, ``acquire`` waits for a
    release (up to ``timeout`` seconds, then ``TimeoutError``).

    Buffers are pinned when ``pin_memory`` is true, which defaults to whether CUDA is available,
    so device copies into them run asynchronously at full link speed.
    """

    def __init__(self, capacity_bytes: int, *, pin_memory: bool | None = None) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise TypeError(f"capacity_bytes: must be an int, got {type(capacity_bytes).__name__}")
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes: must be positive, got {capacity_bytes}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        elif pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory: pinned buffers need CUDA, which is not available")
        self._capacity = capacity_bytes
        self._pin = pin_memory
        self._cond = threading.Condition()
        self._free: list[torch.Tensor] = []
        self._in_use: dict[int, torch.Tensor] = {}
        # Bytes of every buffer held plus those being allocated outside the lock.
        self._held = 0

    @property
    def capacity_bytes(self) -> int:
        """Upper bound on the bytes of all buffers the pool holds."""
        return self._capacity

    @property
    def pinned(self) -> bool:
        """Whether the buffers are page-locked."""
        return self._pin

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers the pool holds now, free or in use."""
        with self._cond:
            return self._held

    @property
    def in_use_bytes(self) -> int:
        """Bytes of the buffers handed out and not yet released."""
        with self._cond:
            return sum(int(b.numel()) for b in self._in_use.values())

    def _take_free(self, nbytes: int) -> torch.Tensor | None:
        # Indices, not list.remove: that compares tensors with ==, which is elementwise.
        fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if not fits:
            return None
        best = min(fits, key=lambda i: int(self._free[i].numel()))
        return self._free.pop(best)

    def _make_room(self, nbytes: int) -> bool:
        """Drop free buffers, largest first, until ``nbytes`` more fit under the capacity."""
        self._free.sort(key=lambda b: int(b.numel()))
        while self._held + nbytes > self._capacity and self._free:
            self._held -= int(self._free.pop().numel())
        return self._held + nbytes <= self._capacity

    def acquire(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        *,
        timeout: float | None = None,
        abort: threading.Event | None = None,
    ) -> torch.Tensor:
        """Return a contiguous ``dtype`` tensor of ``shape`` from the pool (contents undefined).

        Waits up to ``timeout`` seconds (``None``: no limit) for buffers in use to be released
        when the pool is full, then raises ``TimeoutError``. A request larger than the
        capacity raises ``ValueError`` at once. Setting ``abort`` (then :meth:`wake`) ends a
        wait with ``TimeoutError``.
        """
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"shape: dimensions must be non-negative, got {dims}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(dims) * itemsize
        if nbytes == 0:
            raise ValueError(f"shape: {dims} holds no bytes; a pooled buffer must not be empty")
        if nbytes > self._capacity:
            raise ValueError(
                f"shape: {dims} of {dtype} needs {nbytes} bytes, more than the pool's "
                f"capacity of {self._capacity}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                raw = self._take_free(nbytes)
                if raw is not None:
                    break
                if self._make_room(nbytes):
                    self._held += nbytes
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if abort is not None and abort.is_set():
                    raise TimeoutError("BufferPool: the wait for a buffer was abandoned")
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"BufferPool: {nbytes} bytes not available within {timeout} s "
                        f"({self._capacity} byte capacity, all in use)"
                    )
                self._cond.wait(remaining)
        if raw is None:
            try:
                raw = _aligned(nbytes, self._pin)
            except BaseException:
                with self._cond:
                    self._held -= nbytes
                    self._cond.notify_all()
                raise
        view = raw[:nbytes].view(dtype).view(dims)
        with self._cond:
            self._in_use[int(view.data_ptr())] = raw
        return view

    async def acquire_async(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """:meth:`acquire` for a coroutine: waits in a worker thread, never on the loop.

        Cancellation-safe: a cancelled caller abandons its wait, and a buffer that was
        handed out just as the cancellation came is released again, so none leaks.
        """
        abort = threading.Event()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, lambda: self.acquire(shape, dtype, abort=abort))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            abort.set()
            self.wake()

            def give_back(f: asyncio.Future[torch.Tensor]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.release(f.result())

            fut.add_done_callback(give_back)
            raise

    def wake(self) -> None:
        """Make waiting :meth:`acquire` calls re-check their ``abort`` events."""
        with self._cond:
            self._cond.notify_all()

    def release(self, buffer: torch.Tensor) -> None:
        """Return a tensor obtained from :meth:`acquire` to the pool."""
        with self._cond:
            raw = self._in_use.pop(int(buffer.data_ptr()), None)
            if raw is None:
                raise ValueError("buffer: not acquired from this pool, or already released")
            self._free.append(raw)
            self._cond.notify_all()

    @contextmanager
    def buffer(
        self, shape: Sequence[int], dtype: torch.dtype, *, timeout: float | None = None
    ) -> Iterator[torch.Tensor]:
        """Acquire a buffer for the duration of a ``with`` block."""
        view = self.acquire(shape, dtype, timeout=timeout)
        try:
            yield view
        finally:
            self.release(view)

    def clear(self) -> None:
        """Drop the free buffers (those in use stay valid and return on release)."""
        with self._cond:
            for raw in self._free:
                self._held -= int(raw.numel())
            self._free.clear()
            self._cond.notify_all()


#: Buffers start on a page boundary: an O_DIRECT write or read of a pooled chunk then goes
#: straight between the device and the buffer, with no bounce copy (which, made in Python,
#: would also hold the GIL and stall the event loop).
_ALIGN = 4096


def _aligned(nbytes: int, pin: bool) -> torch.Tensor:
    """``nbytes`` of uint8 starting at a 4096-byte boundary (a view that keeps its base)."""
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -raw.data_ptr() % _ALIGN
    return raw[skip : skip + nbytes]
