"""The L2 adapter contract: one async ABC every backend implements.

A small abstract core (``put``, ``get``, ``size``, ``delete``, ``scan``) carries the
semantics; everything else has a documented default built on the core that adapters may
override for speed (one round trip or one submission for a batch). Adapters convert their
backend's exceptions into :mod:`flexkv_store.errors` at one seam; a miss is ``None`` /
``False``, never an exception.

Sizes are payload bytes everywhere (what the caller put), never headers or padding.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from flexkv_store.errors import BufferTooSmallError, InvalidKeyError, StorageError
from flexkv_store.keyformat import ObjectKey, as_bytes_view

__all__ = [
    "Borrowed",
    "Buffer",
    "Capabilities",
    "L2Adapter",
    "ObjectInfo",
    "check_key",
    "raise_batch",
    "writable_view",
]

#: Anything ``put`` accepts: bytes, bytearray, memoryview, numpy arrays, contiguous CPU
#: torch tensors (CUDA tensors too on the gds adapter).
Buffer = Any

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What ``scan`` yields: the key, its payload size and last-modified time (unix seconds)."""

    key: ObjectKey
    size: int
    last_modified: float


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Static facts about an adapter that tests, the store and the admin API branch on."""

    #: ``get_into``/``put`` take CUDA tensors directly (GPU Direct Storage).
    device_buffers: bool = False
    #: ``scan`` lists what is stored (restart recovery and quota rebuild need it).
    listing: bool = True
    #: Several processes can open the same storage and see one another's objects.
    shared_across_processes: bool = False
    #: Objects survive ``aclose`` and a process restart.
    persistent: bool = False
    #: Reads verify a checksum, so corruption is a miss (False for raw, header-less formats).
    verifies_checksums: bool = True


@dataclass
class CheckReport:
    """What :meth:`L2Adapter.check` (``flexkv-store fsck``) found."""

    #: Objects examined and their payload bytes.
    objects: int = 0
    bytes: int = 0
    #: Objects that failed their header or checksum check (wire key or path each).
    corrupt: list[str] = field(default_factory=list)
    #: Leftover temporary files of interrupted writes (paths).
    temp_files: list[str] = field(default_factory=list)
    #: What is not ours: files or keys without our header, or whose header names another
    #: key (paths or names; left alone unless ``remove_foreign``). DESIGN section 14.
    foreign: list[str] = field(default_factory=list)
    #: Corrupt objects and temp files removed (with ``repair=True``).
    removed: int = 0
    #: Foreign objects removed (with ``remove_foreign=True``, ``fsck --remove-foreign``).
    foreign_removed: int = 0

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.temp_files


def check_key(key: object) -> ObjectKey:
    """Adapters take :class:`ObjectKey` values only, never raw strings."""
    if type(key) is not ObjectKey and not isinstance(key, ObjectKey):
        raise TypeError(f"key must be an ObjectKey, not {type(key).__name__}")
    return key


def writable_view(out: Buffer) -> memoryview:
    """A flat writable byte view of a caller-owned buffer (bytearray, numpy, CPU tensor)."""
    mv = as_bytes_view(out)
    if mv.readonly:
        raise TypeError("out must be a writable buffer")
    return mv


def raise_batch(what: str, keys: Sequence[ObjectKey], results: Sequence[Exception | None]) -> None:
    """Raise the failures of a batch's per-item ``results`` (see :meth:`L2Adapter.put_each`).

    One failure is raised unchanged; several become one ``StorageError`` (of the items' own
    class when they share one) that says how many failed and which first, chained to it.
    """
    failed = [(k, e) for k, e in zip(keys, results, strict=True) if e is not None]
    if not failed:
        return
    if len(failed) == 1:
        raise failed[0][1]
    key, first = failed[0]
    kind = type(first)
    if any(type(e) is not kind for _, e in failed):
        kind = StorageError
    if not issubclass(kind, StorageError) or kind is BufferTooSmallError:
        raise first  # all of one kind whose constructor takes more than a message
    # The same class as the items' errors when they agree (e.g. all unavailable).
    raise kind(
        f"{what}: {len(failed)} of {len(results)} objects not stored; "
        f"first {key.to_wire()}: {first}"
    ) from first


class Borrowed:
    """A stored payload lent by :meth:`L2Adapter.borrow`; :meth:`release` it once read.

    ``view`` may be writable (so that torch can wrap it without a warning), but it is the
    stored object itself: never write through it.
    """

    __slots__ = ("_release", "view")

    def __init__(self, view: memoryview, release: Callable[[], None]) -> None:
        self.view = view
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """Hand the payload back (idempotent)."""
        fn, self._release = self._release, None
        if fn is not None:
            fn()


class L2Adapter(ABC):
    """An async key -> bytes store for KV chunks (filesystem, Redis, S3, GDS, memory).

    Implementations set :attr:`name` and :attr:`capabilities`, implement the abstract core
    and map their backend's errors to :mod:`flexkv_store.errors` in one place. Every
    adapter is an async context manager; ``aclose`` releases clients, rings and files.
    """

    #: Registry name (``memory``, ``fs``, ``redis``, ``s3``, ``gds``).
    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: How many single operations the default batch methods run at once.
    batch_concurrency: int = 16
    #: Whether a read that finds a corrupt object also deletes it (adapters that can honor
    #: it do; the default :meth:`check` turns it off unless asked to repair).
    delete_corrupt: bool = True

    # -- abstract core -----------------------------------------------------------------

    @abstractmethod
    async def put(self, key: ObjectKey, data: Buffer) -> None:
        """Store ``data`` under ``key`` atomically.

        A concurrent or later reader sees the old object, the new one, or nothing; never
        a torn one. ``data`` may be any contiguous buffer; it is not retained.
        """

    @abstractmethod
    async def get(self, key: ObjectKey) -> bytes | None:
        """The payload stored under ``key``; ``None`` on a miss or a failed checksum."""

    @abstractmethod
    async def size(self, key: ObjectKey) -> int | None:
        """The payload size of ``key`` in bytes, or ``None`` if absent."""

    @abstractmethod
    async def delete(self, key: ObjectKey) -> bool:
        """Remove ``key``; ``True`` if it existed."""

    @abstractmethod
    def scan(
        self, model_name: str | None = None, cache_salt: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        """Every stored object, optionally only one model's and/or one salt's.

        ``cache_salt=""`` selects unsalted keys; ``None`` means any salt. The order is
        unspecified. Objects written or deleted during a scan may or may not appear.
        """

    # -- defaults built on the core ----------------------------------------------------

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        """Read ``key`` into the caller-owned writable buffer ``out``; return its length.

        ``None`` on a miss; :class:`~flexkv_store.errors.BufferTooSmallError` when the
        object does not fit (``out`` is then left unchanged). Note to implementers: the
        default reads into a temporary and copies; override it to read in place.
        """
        check_key(key)
        view = writable_view(out)
        data = await self.get(key)
        if data is None:
            return None
        if len(data) > view.nbytes:
            raise BufferTooSmallError(len(data), view.nbytes)
        view[: len(data)] = data
        return len(data)

    async def exists(self, key: ObjectKey) -> bool:
        """Whether ``key`` is stored. The default asks :meth:`size`."""
        return await self.size(key) is not None

    async def put_each(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> list[Exception | None]:
        """Store several objects; one outcome per item, in order (``None``: stored).

        Each object is atomic on its own, the batch is not: a failed item leaves that key
        with its old object or none, whatever happened to the others. Every item has
        finished (no thread or request still reads its buffer) when this returns. Errors
        are :class:`~flexkv_store.errors.StorageError` (or ``InvalidKeyError`` for a key
        the adapter cannot store); anything else is raised.

        Note to implementers: the default runs :meth:`put` with bounded concurrency.
        Override it to send a batch in one round trip or submission.
        """
        pairs = list(items)
        sem = asyncio.Semaphore(max(1, self.batch_concurrency))

        async def one(kv: tuple[ObjectKey, Buffer]) -> Exception | None:
            async with sem:
                try:
                    await self.put(kv[0], kv[1])
                except (StorageError, InvalidKeyError) as exc:
                    return exc
                return None

        return list(await asyncio.gather(*(one(kv) for kv in pairs)))

    async def put_many(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> None:
        """Store several objects; raise if any failed (see :meth:`put_each`).

        A single failure is raised as it is; several as one
        :class:`~flexkv_store.errors.StorageError` that counts them, chained to the first.
        """
        pairs = list(items)
        raise_batch(
            self.name or type(self).__name__, [k for k, _ in pairs], await self.put_each(pairs)
        )

    async def get_many(self, keys: Sequence[ObjectKey]) -> list[bytes | None]:
        """Payloads of ``keys`` in order, ``None`` for each miss."""
        return await self._run_many(self.get, list(keys))

    async def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Whether each of ``keys`` is stored, in order."""
        return await self._run_many(self.exists, list(keys))

    async def delete_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Delete each of ``keys``; whether each existed, in order."""
        return await self._run_many(self.delete, list(keys))

    async def check(self, *, repair: bool = False, remove_foreign: bool = False) -> CheckReport:
        """Verify every stored object; with ``repair``, remove what is corrupt or torn.

        What is not ours (:meth:`scan_foreign`) is listed in ``foreign`` and removed only
        with ``remove_foreign`` (``fsck --remove-foreign``), never by ``repair``.

        Note to implementers: the default lists with :meth:`scan` and reads each object
        with :meth:`get` (with :attr:`delete_corrupt` off unless repairing), counting listed
        objects that read back as misses as corrupt, then lists :meth:`scan_foreign`.
        Override it to find temp files or to verify without reading whole objects.
        """
        report = CheckReport()
        previous = self.delete_corrupt
        self.delete_corrupt = repair
        try:
            async for info in self.scan():
                report.objects += 1
                report.bytes += info.size
                if await self.get(info.key) is None:
                    report.corrupt.append(info.key.to_wire())
                    if repair:
                        await self.delete(info.key)  # the read may have removed it already
                        if not await self.exists(info.key):
                            report.removed += 1
        finally:
            self.delete_corrupt = previous
        async for name in self.scan_foreign():
            report.foreign.append(name)
            if remove_foreign and await self.remove_foreign(name):
                report.foreign_removed += 1
        return report

    def lend(self, nbytes: int) -> memoryview | None:
        """Optional: writable memory of ``nbytes`` that a following :meth:`put` adopts.

        For adapters that keep payloads in their own memory (memory): the caller fills
        the buffer (e.g. gathers KV blocks straight into it) and passes it, unchanged in
        length, to ``put``/``put_each``, which then keeps it instead of copying it. The
        caller must not touch it after that put, and hands it back with :meth:`unlend`
        whatever happened (a no-op once adopted). The default lends nothing.
        """
        return None

    def unlend(self, buf: memoryview) -> None:
        """Hand back a buffer from :meth:`lend` that no put adopted (no-op otherwise)."""
        return None

    def borrow(self, key: ObjectKey) -> Borrowed | None:
        """Optional: the stored payload of ``key`` itself, to read without a copy.

        For adapters that keep payloads in their own memory (memory): the value stays
        as it is until :meth:`Borrowed.release`, even if the key is overwritten or
        deleted meanwhile, and must be what :meth:`get_into` would read. ``None`` when
        absent or not lendable (the default): use :meth:`get_into`. Never write through
        the view.
        """
        return None

    async def scan_foreign(self) -> AsyncIterator[str]:
        """Names in this adapter's namespace (its prefix) that are not its objects.

        Values without our header, or whose header names another key than the name does
        (DESIGN section 14): what :meth:`scan` skips and :meth:`check` reports as foreign.
        The default (for adapters that own their whole namespace, like memory) is none.
        """
        return
        yield  # an async generator that yields nothing

    async def remove_foreign(self, name: str) -> bool:
        """Remove one name :meth:`scan_foreign` listed (``fsck --remove-foreign`` only).

        Nothing else may delete what is not ours. ``True`` if it was removed.
        """
        raise NotImplementedError(f"{type(self).__name__} lists no foreign objects")

    async def aclose(self) -> None:
        """Release clients, rings and file descriptors. Idempotent."""
        return None

    def info(self) -> dict[str, Any]:
        """Run-time facts about this instance (I/O engine, direct I/O, server version ...).

        Secrets never appear here.
        """
        return {"adapter": self.name}

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run_many(self, fn: Callable[[_T], Awaitable[_R]], args: Sequence[_T]) -> list[_R]:
        """Run ``fn`` over ``args`` with at most :attr:`batch_concurrency` in flight.

        Every call runs to completion before the first error is raised, so no operation is
        left half-done in the background.
        """
        if not args:
            return []
        if len(args) == 1:
            return [await fn(args[0])]
        sem = asyncio.Semaphore(max(1, self.batch_concurrency))

        async def one(arg: _T) -> _R:
            async with sem:
                return await fn(arg)

        results = await asyncio.gather(*(one(a) for a in args), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]
