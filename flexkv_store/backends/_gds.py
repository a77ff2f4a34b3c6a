"""The gds adapter: the fs adapter's files, with CUDA tensors moved by cuFile (kvikio).

Files. :class:`GdsAdapter` *is* an :class:`~flexkv_store.backends._fs.FsAdapter`: same
layout, same 4096-byte padded header in front of the payload (so payloads sit at a
4096-aligned file offset, as cuFile wants), same temp-file-then-rename publication, scan,
temp cleanup and :meth:`check`. A gds directory opened by the fs adapter reads the same,
and the other way round.

Buffers. Host buffers (bytes, numpy, CPU tensors) take the fs path unchanged. Contiguous
CUDA torch tensors are accepted by :meth:`put`, :meth:`put_many` and :meth:`get_into`:

- with cuFile in use, a put writes the header from the host into a fresh temp file and
  the payload straight from device memory at offset 4096 (``CuFile.pwrite``), then
  applies the fsync policy and renames; a ``get_into`` reads and checks the header on the
  host, then reads the payload straight into the tensor (``CuFile.pread``). Both cuFile
  handles are opened through ``/proc/self/fd``, so header and payload always come from
  one inode even while writers replace the object;
- otherwise (no kvikio, no GPU, or ``use_cufile=false``) the tensor is staged through a
  host buffer (pinned, from torch's caching host allocator) and the fs path does the I/O.

Checksums on the cuFile path. The header's xxh3-64 covers the payload, and a GPU cannot
compute xxh3, so the bytes are hashed on the host: the payload is copied device -> pinned
host in chunks of 8 MiB on a side stream, double-buffered so that the copy of one chunk
overlaps the hashing of the previous one. On a put this gives the header's checksum; on a
read it verifies the bytes that actually landed in the tensor (end to end, after the DMA),
and a mismatch, short read or bad header is a miss: counted in ``corrupt_objects``,
logged and the file removed as on the fs path. The costs are a device -> host pass over
the payload (PCIe is faster than the drive) and host hashing, never a second disk read,
and the format stays exactly the fs adapter's. On a miss the tensor may already hold the
bad bytes (as with the fs adapter's in-place O_DIRECT reads): a ``None`` result means
"do not use the buffer".

Stream order. The adapter records an event on the caller's current CUDA stream when a call
starts and waits for it before touching the tensor, so kernels the caller queued before the
call are done first; when the call returns, every copy into the tensor has completed.

When cuFile is used. ``use_cufile=false``: never. ``true``: required; opening fails with
:class:`~flexkv_store.errors.BackendUnavailableError` saying why it cannot be used.
``auto``: used when kvikio is importable, ``torch.cuda.is_available()`` and a cuFile
handle opens on the first directory. :meth:`info` reports ``cufile`` and, when it is off,
``cufile_note`` with the reason. This module imports neither torch nor kvikio; with
``auto`` and no kvikio installed, opening imports nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import xxhash

from flexkv_store.backends._fs import (
    _O_CLOEXEC,
    FsAdapter,
    _fsync_dir,
    _Job,
)
from flexkv_store.backends._io import ALIGN
from flexkv_store.backends.base import Buffer, Capabilities, L2Adapter, check_key
from flexkv_store.backends.config import GdsConfig
from flexkv_store.errors import (
    BackendUnavailableError,
    BufferTooSmallError,
    CorruptObjectError,
    StorageError,
)
from flexkv_store.keyformat import ObjectKey, as_bytes_view, decode_header, encode_header

if TYPE_CHECKING:
    import torch

__all__ = ["GdsAdapter"]

log = logging.getLogger(__name__)

#: Device -> host staging chunk for checksums (two of them, pinned, per call).
_HASH_CHUNK = 8 << 20
_INSTALL_HINT = "pip install 'flexkv-store[gds]'"


def _is_device(data: object) -> bool:
    """Whether ``data`` is a CUDA tensor (duck-typed, so torch need not be imported)."""
    return getattr(data, "is_cuda", False) is True


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor (shares its memory)."""
    import torch

    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous")
    return t.detach().reshape(-1).view(torch.uint8)


def _caller_event(t: torch.Tensor) -> torch.cuda.Event | None:
    """An event on the caller's current stream, for worker threads to wait on.

    Worker threads have their own current stream, which does not order after the
    caller's: without this, a copy could read a tensor the caller's kernels are still
    writing, or overwrite one they are still reading.
    """
    if not t.is_cuda:
        return None
    import torch

    event = _new_event()
    event.record(torch.cuda.current_stream(t.device))
    return event


def _new_event() -> torch.cuda.Event:
    import torch

    return torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves it unannotated


def _wait(event: torch.cuda.Event | None) -> None:
    if event is not None:
        event.synchronize()


def _host_buffer(n: int, pin: bool) -> torch.Tensor:
    """A host ``uint8`` buffer; pinned ones come from torch's caching host allocator,
    so repeated calls do not pay for page locking each time."""
    import torch

    return torch.empty(n, dtype=torch.uint8, pin_memory=pin)


def _stage_to_host(flat: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
    _wait(ready)
    host = _host_buffer(flat.numel(), flat.is_cuda)
    host.copy_(flat)
    return host


def _copy_from_host(
    dst: torch.Tensor, host: torch.Tensor, n: int, ready: torch.cuda.Event | None
) -> None:
    _wait(ready)
    dst[:n].copy_(host[:n])  # synchronous: complete when the call returns


def tensor_checksum(flat: torch.Tensor) -> int:
    """xxh3-64 of a flat ``uint8`` tensor's bytes, streamed through host memory.

    Chunks of :data:`_HASH_CHUNK` bytes are copied into two alternating (pinned) host
    buffers on a side stream; while one chunk is hashed the next one is in flight. Equal
    to :func:`flexkv_store.keyformat.checksum` of the same bytes. Host tensors take the
    same loop (plain copies), which is how the CPU tests exercise it.
    """
    import torch

    n = flat.numel()
    h = xxhash.xxh3_64()
    if n == 0:
        return h.intdigest()
    chunk = min(n, _HASH_CHUNK)
    cuda = flat.is_cuda
    bufs = [_host_buffer(chunk, cuda) for _ in range(2 if n > chunk else 1)]
    stream = torch.cuda.Stream(device=flat.device) if cuda else None  # type: ignore[no-untyped-call]
    starts = range(0, n, chunk)

    def issue(i: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        start = starts[i]
        buf = bufs[i % len(bufs)][: min(chunk, n - start)]
        if stream is None:
            buf.copy_(flat[start : start + buf.numel()])
            return buf, None
        with torch.cuda.stream(stream):
            buf.copy_(flat[start : start + buf.numel()], non_blocking=True)
            done = _new_event()
            done.record(stream)
        return buf, done

    pending = issue(0)
    for i in range(len(starts)):
        # The next chunk goes into the other buffer, whose previous chunk is hashed.
        following = issue(i + 1) if i + 1 < len(starts) else None
        buf, done = pending
        _wait(done)
        h.update(as_bytes_view(buf))
        if following is not None:
            pending = following
    return h.intdigest()


def _kvikio_installed() -> bool:
    if "kvikio" in sys.modules:
        return sys.modules["kvikio"] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec("kvikio") is not None
    except (ImportError, ValueError):
        return False


class GdsAdapter(FsAdapter):
    """The fs adapter's files, with CUDA tensors moved by cuFile when GDS is usable.

    See the module docstring for the buffer paths, the checksum policy and when cuFile
    is used. Every fs config key applies; ``use_cufile`` (``auto``/``true``/``false``)
    is added.
    """

    name = "gds"
    capabilities: ClassVar[Capabilities] = Capabilities(
        device_buffers=True,
        listing=True,
        shared_across_processes=True,
        persistent=True,
        verifies_checksums=True,
    )
    # mypy reads the base's ``config_class = FsConfig`` as fixing the type; a subclass's
    # config is the right one here.
    config_class = GdsConfig  # type: ignore[assignment]
    config: GdsConfig

    def __init__(self, config: GdsConfig) -> None:
        super().__init__(config)
        self._kvikio: Any = None
        self._compat_mode: str | None = None
        try:
            self._cufile, self._cufile_note = self._resolve_cufile()
        except BaseException:
            # The fs side is open already (worker pool, rings): do not leak it.
            self._executor.shutdown(wait=False)
            self._engine.close()
            raise

    # -- cuFile resolution ----------------------------------------------------------------

    def _resolve_cufile(self) -> tuple[bool, str | None]:
        mode = self.config.use_cufile
        wanted = mode if isinstance(mode, bool) else {"true": True, "false": False}.get(mode)
        if wanted is False:
            return False, "disabled by use_cufile=false"
        reason = self._cufile_unavailable()
        if reason is None:
            log.info("gds adapter: cuFile in use (kvikio compat mode: %s)", self._compat_mode)
            return True, None
        if wanted:
            raise BackendUnavailableError(f"gds: use_cufile=true, but cuFile is unusable: {reason}")
        log.info("gds adapter: staging CUDA tensors through host memory: %s", reason)
        return False, reason

    def _cufile_unavailable(self) -> str | None:
        """Why cuFile cannot be used here, or None (and kvikio loaded) if it can."""
        if not _kvikio_installed():
            return f"kvikio is not installed ({_INSTALL_HINT})"
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if not torch.cuda.is_available():
            return "CUDA is not available (no GPU or no driver)"
        try:
            kvikio = importlib.import_module("kvikio")
        except Exception as exc:  # ImportError, or a CUDA library that fails to load
            return f"kvikio cannot be imported: {exc} ({_INSTALL_HINT})"
        root = self._roots[0]
        probe = os.path.join(root, self._temp_name())  # a crash leaves a cleanable temp
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
            try:
                kvikio.CuFile(_fd_path(fd), "r+").close()
            finally:
                os.close(fd)
                os.unlink(probe)
        except Exception as exc:  # kvikio raises RuntimeError and friends
            return f"cannot open a cuFile handle in {root}: {exc}"
        self._kvikio = kvikio
        self._compat_mode = _compat_mode(kvikio)
        return None

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: ObjectKey, data: Buffer) -> None:
        # docstring inherited
        if not _is_device(data):
            return await super().put(key, data)
        check_key(key)
        flat = _flat_bytes(data)
        ready = _caller_event(flat)
        if not self._cufile:
            host = await self._call("put", _stage_to_host, flat, ready)
            return await super().put(key, host)
        job, _ = self._put_jobs(key, b"")
        if job.error is not None:
            raise job.error  # a key format=raw cannot store
        await self._call("put", self._cufile_put, key, job.final, flat, ready)

    async def put_each(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> list[Exception | None]:
        # docstring inherited
        pairs = list(items)
        host = [i for i, (_, d) in enumerate(pairs) if not _is_device(d)]
        device = [i for i, (_, d) in enumerate(pairs) if _is_device(d)]
        results: list[Exception | None] = [None] * len(pairs)
        if not device:
            return await super().put_each(pairs)

        # Both halves run to completion; each item keeps its own outcome.
        host_results, device_results = await asyncio.gather(
            super().put_each([pairs[i] for i in host]),
            # base class default: one bounded put (self.put) per device buffer
            L2Adapter.put_each(self, [pairs[i] for i in device]),
        )
        for i, r in zip(host, host_results, strict=True):
            results[i] = r
        for i, r in zip(device, device_results, strict=True):
            results[i] = r
        return results

    def _cufile_put(
        self, key: ObjectKey, final: str, flat: torch.Tensor, ready: torch.cuda.Event | None
    ) -> None:
        """Header from the host, payload by cuFile from device memory, then publish."""
        _wait(ready)
        n = flat.numel()
        # Hashed first, written second: if the caller changes the tensor in between, the
        # header disagrees with the payload and readers see a miss, never wrong bytes.
        header = encode_header(key, n, tensor_checksum(flat), padded=True) if self._framed else b""
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, self._temp_name())
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)  # shard directories are made on first use
            fd = os.open(tmp, flags, 0o644)
        try:
            if header:
                _pwrite_all(fd, header, 0)
            if n:
                try:
                    with self._kvikio.CuFile(_fd_path(fd), "r+") as f:
                        written = f.pwrite(flat, n, self._head).get()
                except Exception as exc:
                    raise StorageError(f"gds put: cuFile write failed: {exc}") from exc
                if written != n:
                    raise OSError(errno.EIO, f"short cuFile write ({written} of {n})", tmp)
            policy = self.config.fsync
            if policy == "data":
                os.fdatasync(fd)
            elif policy == "always":
                os.fsync(fd)
            os.close(fd)
            fd = -1
            self._publish(tmp, final, key)  # never over a file that is not ours
            tmp = ""
            if policy == "always":
                _fsync_dir(directory)
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    # -- reads ----------------------------------------------------------------------------

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        # docstring inherited
        if not _is_device(out):
            return await super().get_into(key, out)
        check_key(key)
        flat = _flat_bytes(out)
        ready = _caller_event(flat)
        if self._cufile:
            if not self._storable(key):
                return None
            final = self._locate(key)[1]
            n: int | None = await self._call(
                "get_into", self._cufile_get_into, key, final, flat, ready
            )
            return n
        # The host buffer is as large as ``out``: its size decides BufferTooSmallError
        # exactly as ``out`` would, and ``out`` is written only after a verified read.
        host = await self._call("get_into", _host_buffer, flat.numel(), flat.is_cuda)
        n = await super().get_into(key, host)
        if n is not None:
            await self._call("get_into", _copy_from_host, flat, host, n, ready)
        return n

    def _cufile_get_into(
        self, key: ObjectKey, final: str, flat: torch.Tensor, ready: torch.cuda.Event | None
    ) -> int | None:
        job = _Job(key, final)
        try:
            job.fd = os.open(final, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            n = os.fstat(job.fd).st_size - self._head
            if n < 0:
                self._corrupt(job, f"truncated: {n + self._head} bytes, shorter than the header")
                return None
            if n > flat.numel():
                if self._framed and not self._holds_key_at(final, key):
                    self._corrupt(job, "not ours", foreign=True)  # a miss, not an error
                    return None
                raise BufferTooSmallError(n, flat.numel())  # before anything is written
            expected: int | None = None
            if self._framed:
                try:
                    head = decode_header(os.pread(job.fd, ALIGN, 0))
                    if head.key != key:
                        why = f"its header names another key ({head.key})"
                        self._corrupt(job, why, foreign=True)
                        return None
                    if head.payload_len != n:
                        raise CorruptObjectError(
                            f"header says {head.payload_len} payload bytes, the file has {n}"
                        )
                except CorruptObjectError as exc:
                    self._corrupt(job, str(exc))
                    return None
                expected = head.checksum
            _wait(ready)
            dst = flat[:n]
            if n:
                try:
                    with self._kvikio.CuFile(_fd_path(job.fd), "r") as f:
                        got = f.pread(dst, n, self._head).get()
                except Exception as exc:
                    raise StorageError(f"gds get_into: cuFile read failed: {exc}") from exc
                if got != n:
                    self._corrupt(job, f"read {got} of {n} payload bytes")
                    return None
            if expected is not None and tensor_checksum(dst) != expected:
                self._corrupt(job, "payload checksum mismatch")
                return None
            return n
        finally:
            job.release()

    # -- info -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        # docstring inherited
        info = super().info()
        info.update(
            use_cufile=self.config.use_cufile,
            cufile=self._cufile,
            cufile_note=self._cufile_note,
            kvikio_compat_mode=self._compat_mode,
        )
        return info


def _fd_path(fd: int) -> str:
    """A path that reopens exactly the inode open as ``fd``.

    cuFile handles are opened by path; going through ``/proc/self/fd`` rather than the
    object's name means a rename by a concurrent writer cannot slip another file in.
    """
    return f"/proc/self/fd/{fd}"


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "zero-length write")
        view = view[n:]
        offset += n


def _compat_mode(kvikio: Any) -> str | None:
    """kvikio's own compatibility mode (POSIX I/O instead of GDS), as text; None if unknown.

    In compat mode kvikio still reads into device memory, through its own bounce buffers:
    correct, just not GPUDirect. The accessor moved between kvikio releases.
    """
    defaults = getattr(kvikio, "defaults", None)
    for name, args in (("compat_mode", ()), ("get", ("compat_mode",))):
        fn = getattr(defaults, name, None)
        if fn is None:
            continue
        try:
            return str(fn(*args))
        except Exception:
            continue
    return None
