"""The fs adapter: one file per object under one or several directories.

Layout. An object lives in ``{root}/{aa}/{bb}/{filename}`` (``sharded``, the default: two
levels of 256 subdirectories each, so millions of objects never crowd one directory) or
``{root}/{filename}`` (``flat``, LMCache-compatible). ``filename`` is
:meth:`ObjectKey.to_filename` (``h-{sha256}.data`` for overlong keys, whose full key is then
only in the header). With several roots (``fs:///a;/b``) a 64-bit xxh3 of the filename
picks the root (low bits) and the shard directories (top 16 bits), the same in every
process.

Format. ``framed`` files are a 4096-byte header (magic, lengths, xxh3 checksums, the wire
key; see :mod:`flexkv_store.keyformat._framing`) followed by the payload, so payloads are
4096-aligned in the file and O_DIRECT can read them in place. ``raw`` files are the payload
only (LMCache interchange): no checksum, and keys with overlong filenames cannot be stored.
A raw directory declares the LMCache generation whose names it holds (``lmcache: "0.4"``,
the 3/4-field names, or ``"0.5"``, LMCache 0.4.7-0.5.x's names with an ``object_group_id``,
of which group 0 is ours to read and write); a name of any other shape is not an object.

Data we did not write (DESIGN section 14). In a framed directory a file is ours only if it
starts with our magic and its header names the key its filename stands for; anything else
is *foreign*: a miss for reads, skipped by scans (so never accounted or evicted), reported
by :meth:`FsAdapter.check` and removed only by ``check(remove_foreign=True)``. No other path
removes or replaces a file that does not start with our magic: a corrupt object is removed
only when it still does, :meth:`FsAdapter.delete` checks the header first, and a put
publishes with ``link()`` (which never replaces a name) and replaces an existing file only
when it is one of ours.

Publication. A put writes ``.tmp-{host}-{pid}-{random}.part`` in the object's directory,
syncs it per the ``fsync`` policy and links it to the final name (or, when one of our
objects is there already, renames it over that), so a reader sees the old object, the new
one or nothing. Temp files left by crashed writers are removed when an
adapter opens: those of dead processes on this host at once, any other only once it is
older than :attr:`FsAdapter.stale_temp_seconds` (a live writer on another host, or one in
this process, is never disturbed).

I/O. Blocking work runs on a pool of ``threads`` worker threads, never on the event loop.
With the io_uring engine a whole ``put_many``/``get_many`` goes to one worker thread that
keeps ``queue_depth`` vectored reads/writes in flight on its ring; with the threads engine
each item of a batch gets its own worker thread. With ``direct_io`` files are opened
O_DIRECT: the header and any 4096-aligned caller buffer go to disk without a copy, an
unaligned buffer through an aligned bounce buffer; a payload that does not end on a 4096
boundary is written with its last block zero-padded and the file is then truncated to
exactly header + payload bytes (so sizes stay exact and the padding never shows).

Checking. :meth:`FsAdapter.check` (``flexkv-store fsck``) walks every directory without
side effects: headers decoded, payload checksums verified in chunks, temp files and foreign
files listed; with ``repair`` it removes corrupt objects and abandoned temp files (by the
same rules as the open-time cleanup); foreign files go only with ``remove_foreign``.

Errors. Every ``OSError`` becomes a :class:`~flexkv_store.errors.StorageError` at one seam
(:func:`_storage_errors`); a failed put leaves no temp file behind. A file that fails its
header or checksum check is a miss: it is counted in :attr:`FsAdapter.corrupt_objects`,
logged and removed (only if it is still the same inode and starts with our magic, so a
fresh object written in the meantime and another program's file both survive).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, ClassVar, TypeVar

import xxhash

from flexkv_store._aio import settle
from flexkv_store._bytes import bytes_of, copy_into
from flexkv_store._threads import worker_pool
from flexkv_store.backends import _uring
from flexkv_store.backends._io import (
    ALIGN,
    READ,
    WRITE,
    Engine,
    IoOp,
    ThreadsEngine,
    UringEngine,
    address_of,
    aligned_buffer,
)
from flexkv_store.backends.base import (
    Buffer,
    Capabilities,
    CheckReport,
    L2Adapter,
    ObjectInfo,
    check_key,
    writable_view,
)
from flexkv_store.backends.config import FsConfig
from flexkv_store.errors import (
    BackendUnavailableError,
    BufferTooSmallError,
    CorruptObjectError,
    InvalidKeyError,
    StorageError,
)
from flexkv_store.keyformat import (
    NAME_MAX,
    ObjectKey,
    as_bytes_view,
    checksum,
    decode_header,
    encode_header,
    from_filename_v05,
    to_filename_v05,
)
from flexkv_store.keyformat._framing import MAGIC

__all__ = ["FsAdapter"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_X = TypeVar("_X")

_TMP_PREFIX = ".tmp-"
_TMP_SUFFIX = ".part"
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
#: Exactly the temp names _temp_name makes. Object files may start with "." too (a model
#: named "./llama-3" gives ".-SEP-llama-3@...data"), so no wider pattern is safe.
_TMP_RE = re.compile(r"\.tmp-[A-Za-z0-9_.]{1,64}-[0-9]+-[0-9a-f]{1,32}\.part")
#: What ObjectKey.to_filename gives for a key whose filename would be overlong.
_HASHED_NAME_RE = re.compile(r"h-[0-9a-f]{64}\.data")
#: What _verify_file reports for a header of ours that names another key than the filename.
_FOREIGN_HEADER = "the header names another key"
#: check() streams payloads through a buffer of this size (never a whole object at once).
_CHECK_CHUNK = 4 << 20
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_PREAD_MAX = 1 << 30
_fallback_logged = False
_fallback_lock = threading.Lock()


@contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    """The one seam where ``OSError`` becomes :class:`StorageError` (``raise ... from``)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            detail = "no space left on device"
        elif exc.errno == errno.EDQUOT:
            detail = "disk quota exceeded"
        elif exc.errno == errno.EIO:
            detail = "I/O error from the device"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            detail = "permission denied or read-only file system"
        else:
            detail = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename else ""
        raise StorageError(f"fs {what}: {detail}{where} [errno {exc.errno}]") from exc
    except RuntimeError as exc:
        # ThreadPoolExecutor refuses work after shutdown: the adapter was closed meanwhile.
        raise StorageError(f"fs {what}: the adapter is closed") from exc


def _log_fallback_once(reason: str) -> None:
    global _fallback_logged
    with _fallback_lock:
        if _fallback_logged:
            return
        _fallback_logged = True
    log.warning("fs adapter: io_uring engine unavailable, using the threads engine: %s", reason)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        # A killed child that its parent has not reaped yet still answers kill(0).
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class _Job:
    """State of one object's put or read while its I/O is in flight."""

    __slots__ = (
        "bounced",
        "copies",
        "error",
        "fd",
        "final",
        "header",
        "key",
        "out",
        "payload",
        "result",
        "scratch",
        "size",
        "tmp",
        "truncate_to",
    )

    def __init__(self, key: ObjectKey, final: str) -> None:
        self.key = key
        self.final = final
        self.tmp = ""
        self.fd = -1
        self.error: BaseException | None = None
        self.scratch: list[Any] = []
        self.truncate_to: int | None = None
        self.header: memoryview | None = None
        self.payload: memoryview | None = None
        #: get_into's destination; None for get (which returns bytes).
        self.out: memoryview | None = None
        #: The payload was read into a bounce buffer and still has to be copied to ``out``.
        self.bounced = False
        self.copies: list[tuple[memoryview, memoryview]] = []
        self.size = 0
        self.result: Any = None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for s in self.scratch:
            s.release()
        self.scratch.clear()


#: Files the Store keeps in an fs root (its quota state and that file's temp copies).
_STORE_FILES = re.compile(
    r"\.?flexkv-quota\.json(?:\..+\.tmp)?|flexkv-accounting\.sqlite(?:-wal|-shm|-journal)?"
)


class FsAdapter(L2Adapter):
    """Objects as files under one or several local directories (see the module docstring).

    Several processes may open the same directories: publication is atomic and reads
    verify checksums, so they never see each other's partial writes.
    """

    name = "fs"
    capabilities: ClassVar[Capabilities] = Capabilities(
        listing=True, shared_across_processes=True, persistent=True, verifies_checksums=True
    )
    config_class = FsConfig
    #: A temp file older than this (seconds) is abandoned even if its writer seems alive.
    stale_temp_seconds: ClassVar[float] = 900.0

    def __init__(self, config: FsConfig) -> None:
        self.config = config
        self._roots = [os.path.abspath(p) for p in config.paths]
        self._framed = config.format == "framed"
        self._head = ALIGN if self._framed else 0
        self._sharded = config.layout == "sharded"
        #: Raw LMCache 0.4.7-0.5.x names (with an object_group_id field).
        self._v05 = not self._framed and config.lmcache == "0.5"
        if not self._framed:
            # Raw files carry no checksum; the flag is per instance, the class default is
            # the framed format's. (Assigned through __dict__: it shadows a ClassVar.)
            self.__dict__["capabilities"] = replace(
                type(self).capabilities, verifies_checksums=False
            )
        #: Objects found corrupt or truncated (each was treated as a miss and removed).
        self.corrupt_objects = 0
        #: Files read at an object's name that are not ours (left alone, a miss).
        self.foreign_objects = 0
        self._count_lock = threading.Lock()
        self._closed = False
        with _storage_errors("open"):
            for root in self._roots:
                os.makedirs(root, exist_ok=True)
            self._direct, self._direct_note = self._probe_direct()
            self._engine, self._engine_note = self._open_engine()
            self._executor = worker_pool(config.threads, "flexkv-fs")
            removed = self._remove_stale_temps()
        if removed:
            log.info("fs adapter: removed %d stale temp file(s) under %s", removed, config.path)

    # -- set-up ---------------------------------------------------------------------------

    def _probe_direct(self) -> tuple[bool, str | None]:
        if not self.config.direct_io:
            return False, None
        if not _O_DIRECT:
            return False, "O_DIRECT is not available on this platform"
        for root in self._roots:
            probe = os.path.join(root, self._temp_name())
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o600)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                note = f"{root} does not support O_DIRECT; using buffered I/O"
                log.warning("fs adapter: %s", note)
                return False, note
            os.close(fd)
            os.unlink(probe)
        return True, None

    def _open_engine(self) -> tuple[Engine, str | None]:
        wanted = self.config.io_engine
        if wanted == "threads":
            return ThreadsEngine(), None
        try:
            return UringEngine(_uring.load(), self.config.queue_depth), None
        except (_uring.UringUnavailable, OSError) as exc:
            if wanted == "io_uring":
                raise BackendUnavailableError(
                    f"fs: io_engine=io_uring is unavailable: {exc}"
                ) from exc
            _log_fallback_once(str(exc))
            return ThreadsEngine(), f"io_uring unavailable: {exc}"

    def _temp_name(self) -> str:
        return f"{_TMP_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(6)}{_TMP_SUFFIX}"

    def _temp_is_stale(self, name: str, mtime: float, now: float) -> bool:
        if now - mtime > self.stale_temp_seconds:
            return True
        parts = name[len(_TMP_PREFIX) : -len(_TMP_SUFFIX)].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
            return False  # another host's writer: only age tells
        return not _pid_alive(int(parts[1]))

    def _object_dirs(self, root: str) -> Iterator[str]:
        """Every directory objects can live in under ``root`` (no deeper recursion)."""
        if not self._sharded:
            yield root
            return
        for top in _subdirs(root):
            yield from _subdirs(top)

    def _remove_stale_temps(self) -> int:
        now = time.time()
        removed = 0
        for root in self._roots:
            dirs = [root, *self._object_dirs(root)] if self._sharded else [root]
            for d in dirs:
                try:
                    it = os.scandir(d)
                except FileNotFoundError:
                    continue
                with it:
                    for e in it:
                        n = e.name
                        if not _TMP_RE.fullmatch(n):
                            continue
                        try:
                            if self._temp_is_stale(n, e.stat().st_mtime, now):
                                os.unlink(e.path)
                                removed += 1
                        except FileNotFoundError:
                            pass  # its writer published or another cleaner got there first
        return removed

    # -- paths ----------------------------------------------------------------------------

    def _filename(self, key: ObjectKey) -> str:
        return to_filename_v05(key) if self._v05 else key.to_filename()

    def _parse_name(self, name: str) -> ObjectKey | None:
        """The key a plain (not hashed) object filename stands for in this directory's format."""
        try:
            if self._v05:
                key, group = from_filename_v05(name)
                return key if group == 0 else None  # LMCache's other object groups
            return ObjectKey.from_filename(name)
        except InvalidKeyError:
            return None

    def _locate(self, key: ObjectKey) -> tuple[str, str]:
        name = self._filename(key)
        directory = self._dir_of(name)
        return directory, os.path.join(directory, name)

    def _dir_of(self, name: str) -> str:
        """The directory that holds the object file ``name`` (root, then shards)."""
        h = xxhash.xxh3_64_intdigest(name.encode("utf-8"))
        root = self._roots[h % len(self._roots)]
        if self._sharded:
            root = os.path.join(root, f"{h >> 56:02x}", f"{(h >> 48) & 0xFF:02x}")
        return root

    def object_path(self, key: ObjectKey) -> str:
        """The file that holds ``key`` (whether or not it exists); for tools and tests."""
        return self._locate(check_key(key))[1]

    def _storable(self, key: ObjectKey) -> bool:
        # Raw files have nowhere to keep a key that the (hashed) filename cannot give back.
        if self._framed:
            return True
        if self._v05:
            return len(to_filename_v05(key).encode("utf-8")) <= NAME_MAX
        return not key.filename_is_overlong

    # -- writes ---------------------------------------------------------------------------

    def _prepare_put(self, job: _Job, payload: memoryview) -> IoOp:
        directory = os.path.dirname(job.final)
        job.tmp = os.path.join(directory, self._temp_name())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
        if self._direct:
            flags |= _O_DIRECT
        try:
            job.fd = os.open(job.tmp, flags, 0o644)
        except FileNotFoundError:
            # Shard directories are created on first use, which costs nothing per put.
            os.makedirs(directory, exist_ok=True)
            job.fd = os.open(job.tmp, flags, 0o644)
        n = payload.nbytes
        bufs: list[memoryview] = []
        header = encode_header(job.key, n, checksum(payload), padded=True) if self._framed else b""
        if not self._direct:
            bufs = [memoryview(header), payload] if self._framed else [payload]
        else:
            if self._framed:
                bufs.append(self._scratch(job, ALIGN, header))
            body = n - n % ALIGN
            if body:
                if address_of(payload) % ALIGN == 0:
                    bufs.append(payload[:body])  # straight from the caller's memory
                else:
                    bufs.append(self._scratch(job, body, payload[:body]))
            if n - body:
                bufs.append(self._scratch(job, ALIGN, payload[body:]))
                job.truncate_to = self._head + n
        bufs = [b for b in bufs if b.nbytes]
        return IoOp(WRITE, job.fd, bufs, 0, sum(b.nbytes for b in bufs), self._finish_put, job)

    def _scratch(self, job: _Job, size: int, fill: bytes | memoryview) -> memoryview:
        """An aligned buffer of ``size`` bytes starting with ``fill``, zero-padded."""
        s = aligned_buffer(size)
        job.scratch.append(s)
        view = s.view(size)
        k = len(fill)
        copy_into(view, fill)  # without the GIL when large (an unaligned payload)
        if k < size:
            view[k:] = bytes(size - k)  # under a page: the partial last block
        return view

    def _finish_put(self, op: IoOp) -> None:
        job: _Job = op.ctx
        try:
            if op.result < 0:
                raise OSError(-op.result, os.strerror(-op.result), job.tmp)
            if op.result != op.expect:
                raise OSError(errno.EIO, "short write", job.tmp)
            if job.truncate_to is not None:
                os.ftruncate(job.fd, job.truncate_to)
            policy = self.config.fsync
            if policy == "data":
                os.fdatasync(job.fd)
            elif policy == "always":
                os.fsync(job.fd)
            os.close(job.fd)
            job.fd = -1
            self._publish(job.tmp, job.final, job.key)
            job.tmp = ""
            if policy == "always":
                _fsync_dir(os.path.dirname(job.final))
        except OSError as exc:
            job.error = _detached(exc)
        finally:
            self._discard(job)

    def _publish(self, tmp: str, final: str, key: ObjectKey) -> None:
        """Give the finished temp file ``tmp`` the object name ``final``.

        ``link()`` never replaces an existing name, so a new object (the common case) is
        published without looking at what is there; an existing file is replaced only if it
        is one of ours (:meth:`_replaceable`), else the put fails and the file stays as it
        was. ``tmp`` is gone afterwards whenever this returns.
        """
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass
        except OSError as exc:
            # A file system without hard links: look first, then rename.
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
        else:
            os.unlink(tmp)
            return
        if not self._replaceable(final, key):
            raise OSError(
                errno.EEXIST,
                "a file this adapter did not write holds the object's name (left alone)",
                final,
            )
        os.rename(tmp, final)

    def _replaceable(self, path: str, key: ObjectKey) -> bool:
        """Whether ``path`` may be replaced: absent, or ``key``'s object of ours.

        Raw names are the data by declaration; a framed file must start with our magic and
        its header (where it decodes) must name ``key``. (Between this check and the
        rename, another program could still publish there: a window of microseconds.)
        """
        return not self._framed or self._holds_key_at(path, key, missing=True)

    def _discard(self, job: _Job) -> None:
        job.release()
        if job.tmp:
            try:
                os.unlink(job.tmp)
            except FileNotFoundError:
                pass
            job.tmp = ""

    def _put_batch(self, items: list[tuple[_Job, memoryview]]) -> list[BaseException | None]:
        """Write ``items`` through the engine; one error (or None) per item, in order."""

        def ops() -> Iterator[IoOp]:
            # Lazily, so only the ops in flight hold a temp file and scratch memory.
            for job, payload in items:
                if job.error is not None:
                    continue
                try:
                    yield self._prepare_put(job, payload)
                except OSError as exc:
                    job.error = _detached(exc)
                    self._discard(job)

        try:
            self._engine.run(ops())
        finally:
            for job, _ in items:
                if job.fd >= 0 or job.tmp:  # only if the engine itself failed mid-batch
                    job.error = job.error or OSError(errno.EIO, "I/O engine failed", job.tmp)
                    self._discard(job)
        return [job.error for job, _ in items]

    def _put_jobs(self, key: ObjectKey, data: Buffer) -> tuple[_Job, memoryview]:
        check_key(key)
        payload = as_bytes_view(data)
        job = _Job(key, self._locate(key)[1])
        if not self._storable(key):
            job.error = InvalidKeyError(
                "key",
                "its filename exceeds 255 bytes, and format=raw cannot keep the key in a "
                "header; use format=framed",
            )
        return job, payload

    async def put(self, key: ObjectKey, data: Buffer) -> None:
        # docstring inherited
        item = self._put_jobs(key, data)
        _raise_first("put", await self._call("put", self._put_batch, [item]))

    async def put_each(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> list[Exception | None]:
        # docstring inherited
        batch = [self._put_jobs(k, d) for k, d in items]
        if not batch:
            return []
        chunks = self._split(batch)
        parts = await asyncio.gather(
            *(self._call("put_many", self._put_batch, chunk) for chunk in chunks),
            return_exceptions=True,
        )
        results: list[Exception | None] = []
        for chunk, part in zip(chunks, parts, strict=True):
            if isinstance(part, BaseException):
                if not isinstance(part, Exception):
                    raise part
                results += [part] * len(chunk)
            else:
                results += [_mapped("put_many", e) for e in part]
        return results

    def _split(self, items: list[_X]) -> list[list[_X]]:
        """Cut a batch into the pieces that go to one worker thread each.

        The threads engine runs one item per worker. The io_uring engine gets pieces of at
        most ``queue_depth`` items (what one ring keeps in flight), and as many pieces as
        there are worker threads: a ring's thread checksums and copies each completed
        object before it reaps the next, so spreading a batch over every worker keeps
        those copies from holding back completions (fewer, fuller rings measured up to 2x
        slower on ``get_many``).
        """
        if not self._engine.batches:
            return [[item] for item in items]
        workers = max(1, self.config.threads)
        size = max(1, min(self.config.queue_depth, -(-len(items) // workers)))
        return [items[i : i + size] for i in range(0, len(items), size)]

    # -- reads ----------------------------------------------------------------------------

    def _prepare_read(self, job: _Job, out: memoryview | None, direct: bool) -> IoOp | None:
        """Open the object and set up its read; None when there is nothing to read."""
        flags = os.O_RDONLY | _O_CLOEXEC | (_O_DIRECT if direct else 0)
        try:
            job.fd = os.open(job.final, flags)
        except FileNotFoundError:
            return None
        total = os.fstat(job.fd).st_size
        n = total - self._head
        if n < 0:
            self._corrupt(job, f"truncated: {total} bytes, shorter than the header")
            return None
        if out is not None and n > out.nbytes:
            if self._framed and not self._holds_key_at(job.final, job.key):
                self._corrupt(job, "not ours", foreign=True)  # a miss, not an error
                return None
            raise BufferTooSmallError(n, out.nbytes)
        job.size = n
        job.out = out
        bufs: list[memoryview] = []
        if not direct and out is None and n <= _PREAD_MAX:
            # Page-cache reads gain nothing from io_uring (they are memcpy-bound), and
            # pread() fills a new bytes object directly: one copy instead of two. (Linux
            # caps one read at ~2 GiB; bigger objects take the vectored path.)
            header = os.pread(job.fd, self._head, 0) if self._framed else b""
            data = os.pread(job.fd, n, self._head) if n else b""
            self._verify(job, header, data, len(header) + len(data))
            return None
        if not direct:
            if self._framed:
                job.header = memoryview(bytearray(ALIGN))
                bufs.append(job.header)
            job.payload = out[:n] if out is not None else memoryview(bytearray(n))
            bufs.append(job.payload)
        elif out is not None and n and address_of(out) % ALIGN == 0:
            # Straight into the caller's buffer; only the partial last block is bounced.
            if self._framed:
                job.header = self._scratch(job, ALIGN, b"")
                bufs.append(job.header)
            body = n - n % ALIGN
            if body:
                bufs.append(out[:body])
            if n - body:
                tail = self._scratch(job, ALIGN, b"")
                bufs.append(tail)
                job.copies.append((tail[: n - body], out[body:n]))
            job.payload = out[:n]
        else:
            s = aligned_buffer(total)
            job.scratch.append(s)
            whole = s.view(_round_up(total))
            bufs.append(whole)
            job.header = whole[: self._head]
            job.payload = whole[self._head : total]
            job.bounced = True
        bufs = [b for b in bufs if b.nbytes]
        return IoOp(READ, job.fd, bufs, 0, total, self._finish_read, job)

    def _finish_read(self, op: IoOp) -> None:
        job: _Job = op.ctx
        try:
            if op.result < 0:
                raise OSError(-op.result, os.strerror(-op.result), job.final)
            for src, dst in job.copies:
                dst[:] = src
            assert job.payload is not None
            self._verify(job, job.header or b"", job.payload, op.result)
        except OSError as exc:
            job.error = _detached(exc)
        finally:
            job.release()

    def _verify(
        self, job: _Job, header: bytes | memoryview, payload: bytes | memoryview, got: int
    ) -> None:
        """Check what was read and set ``job.result``; a bad object becomes a miss."""
        try:
            if self._framed and bytes(header[: len(MAGIC)]) != MAGIC:
                self._corrupt(job, "it does not start with our magic")  # foreign: kept
                job.result = None
                return
            if got != self._head + job.size:
                raise CorruptObjectError(f"read {got} of {self._head + job.size} bytes")
            if self._framed:
                head = decode_header(header)
                if head.key != job.key:
                    self._corrupt(job, f"its header names another key ({head.key})", foreign=True)
                    job.result = None
                    return
                if head.payload_len != job.size:
                    raise CorruptObjectError(
                        f"header says {head.payload_len} payload bytes, the file has {job.size}"
                    )
                if checksum(payload) != head.checksum:
                    raise CorruptObjectError("payload checksum mismatch")
        except CorruptObjectError as exc:
            self._corrupt(job, str(exc))
            job.result = None
            return
        if job.out is None:
            # Without the GIL: worker threads' copies do not serialise.
            job.result = payload if isinstance(payload, bytes) else bytes_of(payload)
        else:
            if job.bounced:
                # Only now: a corrupt object leaves out as it was. Without the GIL.
                copy_into(job.out, payload)
            job.result = job.size

    def _holds_key_at(self, path: str, key: ObjectKey, *, missing: bool = False) -> bool:
        """:func:`_holds_key` through a fresh (never O_DIRECT) descriptor of ``path``;
        ``missing`` when there is no file."""
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            return missing
        try:
            return _holds_key(fd, key)
        finally:
            os.close(fd)

    def _corrupt(self, job: _Job, why: str, *, foreign: bool = False) -> None:
        """A bad file at an object's name: a miss, and removed only if it is ours.

        The file is ours if it starts with our magic (and ``foreign`` is not set, as it is
        for a header that names another key); only then is it counted as corrupt and
        removed, and only while the path still names the file that was read (a writer may
        have published a new object there meanwhile). Anything else is counted in
        :attr:`foreign_objects` and left exactly as it is.
        """
        try:
            fd = os.open(job.final, os.O_RDONLY | _O_CLOEXEC)
        except OSError:
            fd = -1  # gone already: still a miss
        try:
            if fd >= 0 and job.fd >= 0 and not _same_file(job.fd, fd):
                return  # a writer has published a new object there meanwhile
            if foreign or not (self._framed and fd >= 0 and _starts_with_magic(fd)):
                with self._count_lock:
                    self.foreign_objects += 1
                log.debug("fs adapter: %s is not ours (%s); a miss, left alone", job.final, why)
                return
            with self._count_lock:
                self.corrupt_objects += 1
            log.warning("fs adapter: %s is corrupt (%s); treating it as a miss", job.final, why)
            try:
                _unlink_if_same(fd, job.final)
            except OSError:
                pass  # not ours to remove after all (permissions): still a miss
        finally:
            if fd >= 0:
                os.close(fd)
            job.release()

    def _read_batch(
        self, jobs: list[_Job], outs: Sequence[memoryview | None]
    ) -> list[BaseException | None]:
        direct = self._direct

        def ops() -> Iterator[IoOp]:
            for job, out in zip(jobs, outs, strict=True):
                if not self._storable(job.key):
                    continue
                try:
                    op = self._prepare_read(job, out, direct)
                except (OSError, StorageError) as exc:
                    job.error = _detached(exc)
                    job.release()
                    continue
                if op is None:
                    job.release()
                else:
                    yield op

        try:
            self._engine.run(ops())
        finally:
            for job in jobs:
                job.release()
        return [job.error for job in jobs]

    async def _read(self, what: str, keys: Sequence[ObjectKey]) -> list[Any]:
        jobs = [_Job(check_key(k), self._locate(k)[1]) for k in keys]
        parts = await asyncio.gather(
            *(
                self._call(what, self._read_batch, chunk, [None] * len(chunk))
                for chunk in self._split(jobs)
            )
        )
        _raise_first(what, [e for part in parts for e in part])
        return [j.result for j in jobs]

    async def get(self, key: ObjectKey) -> bytes | None:
        # docstring inherited
        result: bytes | None = (await self._read("get", [key]))[0]
        return result

    async def get_many(self, keys: Sequence[ObjectKey]) -> list[bytes | None]:
        # docstring inherited
        if not keys:
            return []
        return await self._read("get_many", list(keys))

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        # docstring inherited
        job = _Job(check_key(key), self._locate(key)[1])
        view = writable_view(out)
        _raise_first("get_into", await self._call("get_into", self._read_batch, [job], [view]))
        n: int | None = job.result
        return n

    # -- metadata -------------------------------------------------------------------------

    def _size_sync(self, key: ObjectKey) -> int | None:
        if not self._storable(key):
            return None
        job = _Job(key, self._locate(key)[1])
        try:
            job.fd = os.open(job.final, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            total = os.fstat(job.fd).st_size
            if not self._framed:
                return total
            try:
                header = decode_header(os.pread(job.fd, ALIGN, 0))
                if header.key != key:
                    self._corrupt(job, f"its header names another key ({header.key})", foreign=True)
                    return None
                if header.payload_len != total - ALIGN:
                    raise CorruptObjectError("header does not match the file")
            except CorruptObjectError as exc:
                self._corrupt(job, str(exc))
                return None
            return header.payload_len
        finally:
            job.release()

    def _delete_sync(self, key: ObjectKey) -> bool:
        if not self._storable(key):
            return False
        path = self._locate(key)[1]
        if not self._framed:
            try:
                os.unlink(path)  # raw: the name is the object, by the directory's declaration
            except FileNotFoundError:
                return False
            return True
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            if not _holds_key(fd, key):
                with self._count_lock:
                    self.foreign_objects += 1
                log.debug("fs adapter: %s is not ours; not deleted", path)
                return False
            return _unlink_if_same(fd, path)
        finally:
            os.close(fd)

    async def size(self, key: ObjectKey) -> int | None:
        # docstring inherited
        check_key(key)
        return await self._call("size", self._size_sync, key)

    async def exists(self, key: ObjectKey) -> bool:
        # docstring inherited
        return await self.size(key) is not None

    async def delete(self, key: ObjectKey) -> bool:
        # docstring inherited
        check_key(key)
        return await self._call("delete", self._delete_sync, key)

    async def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        # docstring inherited
        ks = [check_key(k) for k in keys]
        sizes = await self._call("exists_many", lambda: [self._size_sync(k) for k in ks])
        return [s is not None for s in sizes]

    async def delete_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        # docstring inherited
        ks = [check_key(k) for k in keys]
        return await self._call("delete_many", lambda: [self._delete_sync(k) for k in ks])

    # -- listing --------------------------------------------------------------------------

    def _scan_dirs(
        self, dirs: list[str], model_name: str | None, cache_salt: str | None
    ) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        for d in dirs:
            try:
                it = os.scandir(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    info = self._scan_entry(d, e, model_name, cache_salt)
                    if info is not None:
                        found.append(info)
        return found

    def _scan_entry(
        self, d: str, e: os.DirEntry[str], model_name: str | None, cache_salt: str | None
    ) -> ObjectInfo | None:
        name = e.name
        if not name.endswith(".data"):
            return None  # temp files and anything that is not ours
        hashed = self._framed and _HASHED_NAME_RE.fullmatch(name) is not None
        named = None if hashed else self._parse_name(name)
        if named is None and not hashed:
            return None  # not an object name in this directory's format
        if named is not None and not _wanted(named, model_name, cache_salt):
            return None  # filtered out before the file is even opened
        try:
            if self._framed:
                # Ours only if the header says so: another program's file with an
                # object-like name is never listed, so never accounted or evicted.
                fd = os.open(e.path, os.O_RDONLY | _O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    head = os.pread(fd, ALIGN, 0)
                finally:
                    os.close(fd)
                if head[: len(MAGIC)] != MAGIC:
                    return None
                header = decode_header(head)
                key = header.key
                if named is None:
                    if key.to_filename() != name:
                        return None  # a hashed name whose header holds another key
                elif key != named:
                    return None
                if header.payload_len != st.st_size - ALIGN:
                    return None  # ours but torn: reads and fsck deal with it
                size, mtime = header.payload_len, st.st_mtime
            else:
                assert named is not None
                key = named
                st = e.stat()
                size, mtime = st.st_size, st.st_mtime
        except (CorruptObjectError, OSError):
            return None  # a bad header, unreadable, or gone since the listing
        if model_name is not None and key.model_name != model_name:
            return None
        if cache_salt is not None and key.cache_salt != cache_salt:
            return None
        if self._locate(key)[0] != d:
            return None  # a file get() would never look for (wrong shard or root)
        return ObjectInfo(key, size, mtime)

    def _scan_groups(self) -> list[list[str]]:
        """Directories to list, grouped so that one worker-thread hop lists one group."""
        if not self._sharded:
            return [[root] for root in self._roots]
        return [list(_subdirs(top)) for root in self._roots for top in _subdirs(root)]

    async def scan(
        self, model_name: str | None = None, cache_salt: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        # docstring inherited
        groups = await self._call("scan", self._scan_groups)
        for group in groups:
            for info in await self._call("scan", self._scan_dirs, group, model_name, cache_salt):
                yield info

    # -- fsck -----------------------------------------------------------------------------

    async def check(self, *, repair: bool = False, remove_foreign: bool = False) -> CheckReport:
        """Verify every file under the data directories; change nothing unless asked.

        Every object file's header is decoded and its payload checksum verified, streamed
        in chunks of a few MiB (``raw`` files carry no checksum: they are only counted and
        sized). ``objects``/``bytes`` count every object file examined, corrupt ones
        included (their bytes as found on disk). Findings:

        - ``corrupt``: an object of ours (it starts with our magic) with a bad header, a
          truncated or over-long file, a checksum mismatch. Listed by wire key when the
          header is intact, else by path.
        - ``temp_files``: ``.tmp-*.part`` files (interrupted or in-flight writes).
        - ``foreign``: anything else: files without our magic (LMCache's, a user's), a
          header that names another key than the filename, object-like names in a
          directory where :meth:`get` would never look for them, names of another LMCache
          generation in a raw directory. Never touched by ``repair``; with
          ``remove_foreign`` the foreign files (never directories) are removed and counted
          in ``foreign_removed``.

        With ``repair``, corrupt objects are removed only while their path still names the
        file that was checked (an object published meanwhile survives), and temp files by
        the open-time cleanup's rules: every one of a dead writer on this host, any other
        only once older than :attr:`stale_temp_seconds`, so a live writer is never cut
        short. ``removed`` counts both kinds.
        """
        report = CheckReport()
        now = time.time()
        for group in await self._call("check", self._check_groups):
            part = await self._call("check", self._check_dirs, group, repair, remove_foreign, now)
            report.objects += part.objects
            report.bytes += part.bytes
            report.corrupt += part.corrupt
            report.temp_files += part.temp_files
            report.foreign += part.foreign
            report.removed += part.removed
            report.foreign_removed += part.foreign_removed
        return report

    def _check_groups(self) -> list[list[tuple[str, bool]]]:
        """``(directory, holds_objects)`` lists, one worker-thread hop per list.

        Sharded roots and first-level shard directories hold only shard directories (and
        the odd temp file); anything else there is foreign.
        """
        if not self._sharded:
            return [[(root, True)] for root in self._roots]
        groups: list[list[tuple[str, bool]]] = []
        for root in self._roots:
            groups.append([(root, False)])
            for top in _subdirs(root):
                groups.append([(top, False), *((d, True) for d in _subdirs(top))])
        return groups

    def _check_dirs(
        self, group: list[tuple[str, bool]], repair: bool, remove_foreign: bool, now: float
    ) -> CheckReport:
        report = CheckReport()
        scratch = aligned_buffer(_CHECK_CHUNK)  # cached process-wide; pages touched on use
        try:
            self._check_entries(
                group, repair, remove_foreign, now, report, scratch.view(_CHECK_CHUNK)
            )
        finally:
            scratch.release()
        return report

    def _check_entries(
        self,
        group: list[tuple[str, bool]],
        repair: bool,
        remove_foreign: bool,
        now: float,
        report: CheckReport,
        chunk: memoryview,
    ) -> None:
        for d, holds_objects in group:
            try:
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                name = e.name
                if _TMP_RE.fullmatch(name):
                    report.temp_files.append(e.path)
                    if repair and self._remove_temp_if_stale(e, now):
                        report.removed += 1
                    continue
                if not holds_objects and self._sharded and _SHARD_RE.fullmatch(name) and e.is_dir():
                    continue  # a shard directory: its own group walks it
                if holds_objects and self._check_object(d, e, repair, report, chunk):
                    continue
                if d in self._roots and _STORE_FILES.fullmatch(name):
                    continue  # the store's quota state, kept next to the data by default
                report.foreign.append(e.path)
                if remove_foreign and _remove_foreign_file(e):
                    report.foreign_removed += 1

    def _remove_temp_if_stale(self, e: os.DirEntry[str], now: float) -> bool:
        try:
            if not self._temp_is_stale(e.name, e.stat().st_mtime, now):
                return False
            os.unlink(e.path)
        except FileNotFoundError:
            return False  # its writer published it, or another cleaner got there first
        return True

    def _is_object_name(self, d: str, name: str) -> bool:
        """Whether ``name`` in ``d`` is a file this adapter may have written there."""
        if not name.endswith(".data"):
            return False
        if _HASHED_NAME_RE.fullmatch(name):
            if not self._framed:
                return False  # raw files never use hashed names
        elif self._parse_name(name) is None:
            return False
        # Placement depends only on the name, so a copy in the wrong shard or root is
        # something get() never reads: not ours to judge or remove.
        return self._dir_of(name) == d

    def _check_object(
        self, d: str, e: os.DirEntry[str], repair: bool, report: CheckReport, chunk: memoryview
    ) -> bool:
        """Examine one directory entry; False if it is not an object file of ours (foreign)."""
        if not self._is_object_name(d, e.name) or not e.is_file(follow_symlinks=False):
            return False
        try:
            fd = os.open(e.path, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            return True  # deleted since the listing: nothing left to examine
        try:
            total = os.fstat(fd).st_size
            if not self._framed:
                report.objects += 1
                report.bytes += total
                return True
            if not _starts_with_magic(fd):
                return False  # another program's file with an object-like name
            problem, wire = self._verify_file(fd, total, e.name, chunk)
            if problem == _FOREIGN_HEADER:
                return False  # our framing, another key's name: not this file's object
            report.objects += 1
            report.bytes += max(0, total - self._head)
            if problem is None:
                return True
            report.corrupt.append(wire or e.path)
            log.warning("fs check: %s is corrupt (%s)", e.path, problem)
            if repair and _unlink_if_same(fd, e.path):
                report.removed += 1
        finally:
            os.close(fd)
        return True

    def _verify_file(
        self, fd: int, total: int, name: str, chunk: memoryview
    ) -> tuple[str | None, str | None]:
        """``(problem or None, wire key or None)`` for a framed object file.

        The same checks as a read, with the payload streamed through ``chunk`` so that a
        64 MiB object never sits in memory whole.
        """
        if total < ALIGN:
            return f"truncated: {total} bytes, shorter than the header", None
        try:
            head = decode_header(os.pread(fd, ALIGN, 0))
        except CorruptObjectError as exc:
            return str(exc), None
        if head.key.to_filename() != name:
            return _FOREIGN_HEADER, None
        if head.header_len != ALIGN:
            return "the header is not padded to 4096 bytes", None
        wire = head.key.to_wire()
        n = total - ALIGN
        if head.payload_len != n:
            return f"header says {head.payload_len} payload bytes, the file has {n}", wire
        h = xxhash.xxh3_64()
        offset = ALIGN
        while offset < total:
            got = os.preadv(fd, [chunk[: min(chunk.nbytes, total - offset)]], offset)
            if got == 0:
                return "truncated while being checked", wire
            h.update(chunk[:got])
            offset += got
        if h.intdigest() != head.checksum:
            return "payload checksum mismatch", wire
        return None, wire

    # -- plumbing -------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise StorageError(f"fs {what}: the adapter is closed")
        loop = asyncio.get_running_loop()
        with _storage_errors(what):
            # settle: the worker may be reading or filling a caller's buffer, so a
            # cancelled caller gets control back only once the worker is done with it.
            return await settle(loop.run_in_executor(self._executor, fn, *args))

    async def aclose(self) -> None:
        # docstring inherited
        if self._closed:
            return
        self._closed = True
        # Waits for work already handed to the pool, so no ring is torn down under it.
        await asyncio.to_thread(self._executor.shutdown, True)
        self._engine.close()

    def info(self) -> dict[str, Any]:
        # docstring inherited
        return {
            "adapter": self.name,
            "paths": list(self._roots),
            "layout": self.config.layout,
            "format": self.config.format,
            "io_engine": self._engine.name,
            "io_engine_requested": self.config.io_engine,
            "io_engine_note": self._engine_note,
            "direct_io": self._direct,
            "direct_io_note": self._direct_note,
            "queue_depth": self.config.queue_depth,
            "threads": self.config.threads,
            "fsync": self.config.fsync,
            "verifies_checksums": self._framed,
            "corrupt_objects": self.corrupt_objects,
        }


def _subdirs(d: str) -> Iterator[str]:
    """Shard subdirectories (two lowercase hex digits) of ``d``, sorted."""
    try:
        with os.scandir(d) as it:
            # Symlinks followed: reads and writes go through a linked shard directory
            # (e.g. onto another disk), so the rebuild and fsck must list it too.
            names = sorted(e.name for e in it if _SHARD_RE.fullmatch(e.name) and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for n in names:
        yield os.path.join(d, n)


def _wanted(key: ObjectKey, model_name: str | None, cache_salt: str | None) -> bool:
    return (model_name is None or key.model_name == model_name) and (
        cache_salt is None or key.cache_salt == cache_salt
    )


def _same_file(fd_a: int, fd_b: int) -> bool:
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _starts_with_magic(fd: int) -> bool:
    """Whether the file open as ``fd`` (not O_DIRECT) starts with our framing magic."""
    try:
        return os.pread(fd, len(MAGIC), 0) == MAGIC
    except OSError:
        return False


def _holds_key(fd: int, key: ObjectKey) -> bool:
    """Whether the framed file open as ``fd`` is ours and ``key``'s to delete.

    It must start with our magic; a header that decodes must name ``key`` (one that does
    not decode is a torn object of ours, still ours to remove).
    """
    head = os.pread(fd, ALIGN, 0)
    if head[: len(MAGIC)] != MAGIC:
        return False
    try:
        return decode_header(head).key == key
    except CorruptObjectError:
        return True


def _remove_foreign_file(e: os.DirEntry[str]) -> bool:
    """``fsck --remove-foreign``: remove a foreign file (or link); never a directory."""
    try:
        if e.is_dir(follow_symlinks=False):
            return False
        os.unlink(e.path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("fs check: could not remove foreign file %s: %s", e.path, exc)
        return False
    return True


def _unlink_if_same(fd: int, path: str) -> bool:
    """Remove ``path`` if it still names the file open as ``fd`` (not a newer object)."""
    try:
        mine = os.fstat(fd)
        now = os.stat(path)
        if (mine.st_ino, mine.st_dev) != (now.st_ino, now.st_dev):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _detached(exc: BaseException) -> BaseException:
    """``exc`` without its traceback, to keep on a job.

    The traceback's frames reach the engine's loop, whose locals hold cffi views of the
    job's buffers: kept on the job, that is a reference cycle, and the garbage collector
    may then clear a memoryview before the cffi buffer exported from it (a crash).
    """
    return exc.with_traceback(None)


def _mapped(what: str, exc: BaseException | None) -> Exception | None:
    """One item's error as the adapter reports it (``OSError`` through the seam)."""
    if exc is None:
        return None
    try:
        with _storage_errors(what):
            raise exc
    except Exception as mapped:
        return mapped
    raise AssertionError("unreachable")  # the with block always raises


def _raise_first(what: str, errors: Iterable[BaseException | None]) -> None:
    """Raise the first per-item error of a batch, through the OSError seam."""
    with _storage_errors(what):
        for exc in errors:
            if exc is not None:
                raise exc
