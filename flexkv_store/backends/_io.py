"""The fs adapter's I/O engines: one small synchronous interface, two implementations.

An engine runs a stream of positioned vectored reads and writes (:class:`IoOp`) and calls
each op's ``on_done`` as soon as that op has finished, while later ops may still be in
flight. Engines are called from the adapter's worker threads, never from the event loop.

- :class:`UringEngine`: io_uring through the cffi wrappers of :mod:`._uring`; one ring per
  worker thread, up to ``queue_depth`` ops in flight, one ``io_uring_submit_and_wait`` per
  round. A whole ``put_many``/``get_many`` batch goes through one call.
- :class:`ThreadsEngine`: ``os.preadv``/``os.pwritev`` in the calling worker thread; the
  adapter gets its parallelism by running one batch item per worker thread instead.

:func:`aligned_buffer` hands out page-aligned (4096-byte) scratch buffers for O_DIRECT.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from flexkv_store import _bytes
from flexkv_store._freelist import FreeLists
from flexkv_store.backends._uring import UringLib

__all__ = [
    "ALIGN",
    "READ",
    "WRITE",
    "Engine",
    "IoOp",
    "ThreadsEngine",
    "UringEngine",
    "address_of",
    "aligned_buffer",
]

ALIGN = 4096
READ = 0
WRITE = 1


class IoOp:
    """One positioned vectored read or write of ``expect`` bytes from/to ``bufs``.

    ``result`` is set by the engine: the bytes transferred, or ``-errno``. A read may end
    early at end of file (``result < expect``); a short write is finished by the engine.
    ``on_done`` runs in the engine's thread once the op is complete; ``ctx`` is the
    caller's per-op state.
    """

    __slots__ = ("bufs", "ctx", "expect", "fd", "kind", "offset", "on_done", "result")

    def __init__(
        self,
        kind: int,
        fd: int,
        bufs: list[memoryview],
        offset: int,
        expect: int,
        on_done: Callable[[IoOp], None],
        ctx: Any = None,
    ) -> None:
        self.kind = kind
        self.fd = fd
        self.bufs = bufs
        self.offset = offset
        self.expect = expect
        self.on_done = on_done
        self.ctx = ctx
        self.result = 0


class Engine(Protocol):
    """What the fs adapter needs from an I/O engine."""

    #: ``io_uring`` or ``threads``.
    name: str
    #: Whether a batch should go to :meth:`run` as a whole (True) or item by item, one
    #: worker thread each (False).
    batches: bool

    def run(self, ops: Iterable[IoOp]) -> None:
        """Perform every op, calling its ``on_done``; ``ops`` is consumed lazily.

        An exception raised by ``on_done`` or by the iterator propagates only after every
        op already submitted has completed (their buffers stay referenced until then).
        """

    def close(self) -> None:
        """Release rings and descriptors; idempotent."""


def _finish_sync(op: IoOp, done: int) -> int:
    """Complete a partially transferred op with plain syscalls; the total or ``-errno``.

    Short transfers are rare on regular files (signals, quota edges); finishing them
    synchronously keeps both engines' fast paths simple. Reads stop at end of file.
    """
    while done < op.expect:
        views = _skip(op.bufs, done)
        try:
            if op.kind == WRITE:
                n = os.pwritev(op.fd, views, op.offset + done)
            else:
                n = os.preadv(op.fd, views, op.offset + done)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        if n == 0:
            if op.kind == WRITE:
                return -errno.EIO  # a zero-length write would loop forever
            break
        done += n
    return done


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for b in bufs:
        if n >= b.nbytes:
            n -= b.nbytes
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


def _complete(op: IoOp, errors: list[BaseException]) -> None:
    try:
        op.on_done(op)
    except BaseException as exc:  # collected and re-raised once the ring is drained
        errors.append(exc)


class ThreadsEngine:
    """Synchronous ``preadv``/``pwritev`` in the calling worker thread."""

    name = "threads"
    batches = False

    def run(self, ops: Iterable[IoOp]) -> None:
        # docstring inherited
        errors: list[BaseException] = []
        for op in ops:
            op.result = _finish_sync(op, 0) if op.expect else 0
            _complete(op, errors)
            if errors:
                break
        if errors:
            raise errors[0]

    def close(self) -> None:
        # docstring inherited
        pass


class UringEngine:
    """io_uring with ``queue_depth`` ops in flight per ring, one ring per worker thread.

    Rings are not thread-safe, and the adapter runs several batches at once on its worker
    pool, so each worker thread lazily gets its own ring; :meth:`close` tears them all down
    after the pool has stopped.
    """

    name = "io_uring"
    batches = True
    #: Bytes one ring keeps in flight at most (at least one op always goes). More buys no
    #: bandwidth (fio on one file peaks with 64-256 MiB in flight over every ring), and
    #: every read in flight holds a scratch buffer: with 32 MiB objects, rings of 16 would
    #: outgrow the scratch cache and fault in fresh memory on every batch.
    max_inflight_bytes = 32 << 20

    def __init__(self, uring: UringLib, queue_depth: int) -> None:
        self._ffi = uring.ffi
        self._lib = uring.lib
        self.queue_depth = queue_depth
        self._local = threading.local()
        self._rings: list[Any] = []
        self._rings_lock = threading.Lock()
        self._closed = False
        # Fail at open time, not on the first I/O, if rings cannot be set up.
        self._ring()

    def _ring(self) -> Any:
        ring = getattr(self._local, "ring", None)
        if ring is None:
            err = self._ffi.new("int *")
            ring = self._lib.fkv_ring_open(self.queue_depth, err)
            if ring == self._ffi.NULL:
                raise OSError(err[0], f"io_uring_queue_init: {os.strerror(err[0])}")
            with self._rings_lock:
                if self._closed:
                    self._lib.fkv_ring_close(ring)
                    raise OSError(errno.EBADF, "the io_uring engine is closed")
                self._rings.append(ring)
            self._local.ring = ring
            self._local.user = self._ffi.new("uint64_t[]", self.queue_depth)
            self._local.res = self._ffi.new("int32_t[]", self.queue_depth)
        return ring

    def run(self, ops: Iterable[IoOp]) -> None:
        # docstring inherited
        ffi, lib = self._ffi, self._lib
        ring = self._ring()
        user, res = self._local.user, self._local.res
        qd = self.queue_depth
        it: Iterator[IoOp] | None = iter(ops)
        # Slots map user_data -> (op, cffi objects that must outlive the kernel's use).
        inflight: dict[int, tuple[IoOp, Any, Any]] = {}
        free = deque(range(qd))
        errors: list[BaseException] = []
        held = 0  # bytes of the ops in flight
        waiting: IoOp | None = None  # taken from ``ops``, over the byte budget for now
        while True:
            while (it is not None or waiting is not None) and free and not errors:
                if waiting is not None:
                    op, waiting = waiting, None
                else:
                    assert it is not None
                    try:
                        op = next(it)
                    except StopIteration:
                        it = None
                        break
                    except BaseException as exc:
                        errors.append(exc)
                        break
                if inflight and held + op.expect > self.max_inflight_bytes:
                    waiting = op  # goes once enough of what is in flight has completed
                    break
                if op.expect == 0:
                    op.result = 0
                    _complete(op, errors)
                    continue
                slot = free.popleft()
                iov = ffi.new("struct iovec[]", len(op.bufs))
                pins = [ffi.from_buffer(b) for b in op.bufs]
                for i, (b, p) in enumerate(zip(op.bufs, pins, strict=True)):
                    iov[i].iov_base = p
                    iov[i].iov_len = b.nbytes
                prep = lib.fkv_prep_writev if op.kind == WRITE else lib.fkv_prep_readv
                rc = prep(ring, op.fd, iov, len(op.bufs), op.offset, slot)
                if rc < 0:  # cannot happen with qd slots on a qd ring; stay safe anyway
                    free.appendleft(slot)
                    errors.append(OSError(-rc, f"io_uring prep: {os.strerror(-rc)}"))
                    break
                inflight[slot] = (op, iov, pins)
                held += op.expect
            if not inflight:
                break
            rc = lib.fkv_submit_and_wait(ring, 1)
            if rc < 0 and -rc not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                self._abandon_ring(inflight, -rc, errors)
                break
            n = lib.fkv_reap(ring, user, res, qd)
            for i in range(n):
                slot = int(user[i])
                op, _iov, _pins = inflight.pop(slot)
                held -= op.expect
                free.append(slot)
                r = int(res[i])
                op.result = r if r < 0 or r >= op.expect else _finish_sync(op, r)
                _complete(op, errors)
        if errors:
            raise errors[0]

    def _abandon_ring(
        self, inflight: dict[int, tuple[IoOp, Any, Any]], err: int, errors: list[BaseException]
    ) -> None:
        """The ring failed (not a per-op error): fail what it holds and drop it.

        Tearing the ring down makes the kernel cancel whatever it still had, so no buffer
        is written after its op has been reported as failed; the thread gets a new ring on
        its next batch.
        """
        ring = self._local.ring
        self._local.ring = None
        with self._rings_lock:
            if ring in self._rings:
                self._rings.remove(ring)
        self._lib.fkv_ring_close(ring)
        for op, _iov, _pins in inflight.values():
            op.result = -err
            _complete(op, errors)
        inflight.clear()
        errors.append(OSError(err, f"io_uring_submit_and_wait: {os.strerror(err)}"))

    def close(self) -> None:
        # docstring inherited
        with self._rings_lock:
            if self._closed:
                return
            self._closed = True
            rings, self._rings = self._rings, []
        for ring in rings:
            self._lib.fkv_ring_close(ring)


# -- aligned scratch buffers --------------------------------------------------------------

#: Cap on the scratch memory kept for reuse, process-wide; beyond it buffers are dropped.
_CACHE_LIMIT = 512 << 20
#: Free scratch buffers, shared by every adapter and worker thread.
_cache: FreeLists[_Scratch] = FreeLists(_CACHE_LIMIT)


def _reset_after_fork() -> None:
    # A forked child has one thread: a lock another thread held at the fork stays held.
    global _cache
    _cache = FreeLists(_CACHE_LIMIT)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _size_class(n: int) -> int:
    # Powers of two up to 1 MiB, then whole MiB: a 4 MiB payload plus its 4 KiB header
    # takes 5 MiB, not 8.
    if n > 1 << 20:
        return (n + (1 << 20) - 1) & ~((1 << 20) - 1)
    size = ALIGN
    while size < n:
        size <<= 1
    return size


class _Scratch:
    """A page-aligned private anonymous mapping, kept for reuse when released.

    Made without the GIL (:func:`flexkv_store._bytes.map_anonymous`), on huge pages from
    4 MiB.
    """

    __slots__ = ("mem", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        big = size >= 4 << 20
        self.mem = _bytes.map_anonymous(size, huge=big)

    def view(self, n: int) -> memoryview:
        return self.mem[:n]

    def release(self) -> None:
        _cache.give(self.size, self)  # or dropped: unmapped once its last view is gone


def aligned_buffer(n: int) -> _Scratch:
    """A scratch buffer of at least ``n`` bytes starting on a 4096-byte boundary.

    Buffers come from a process-wide cache shared by every adapter and worker thread
    (anonymous mappings are page-aligned, and reusing them avoids page faults on every
    read); call ``release()`` when the I/O is done.
    """
    size = _size_class(max(n, 1))
    return _cache.take(size) or _Scratch(size)


def address_of(view: memoryview) -> int:
    """The address of a buffer's first byte (for alignment checks); 0 when empty."""
    return _bytes.address_of(view) if view.nbytes else 0
