"""The Store engines call: an L1 CPU tier over ordered L2 backends, quotas and metrics.

Writes go through the quota (UserLRU) first, then to every backend (write-through); reads
try L1, then each backend in order, and promote hits to L1 and to earlier backends. A
backend that fails makes reads misses and is reported (metrics, logs); a write fails with
a clear error only when no backend took it. See DESIGN section 5.

Concurrency: a store belongs to one event loop. Puts and deletes of one salt are
serialized by a per-salt lock (all writes share one lock when a global capacity is set,
since then any salt's objects can be evicted), so a victim chosen by one put is never a key
another put is still writing. Reads take no lock. :meth:`Store.blocking` gives a facade for
engines that call from threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from flexkv_store.backends import L2Adapter, ObjectInfo, open_adapter
from flexkv_store.backends.base import Buffer, check_key, writable_view
from flexkv_store.backends.config import FsConfig, RedisConfig
from flexkv_store.config import StoreConfig, load_config
from flexkv_store.errors import (
    BackendUnavailableError,
    BufferTooSmallError,
    QuotaExceededError,
    StorageError,
)
from flexkv_store.keyformat import ObjectKey, as_bytes_view
from flexkv_store.metrics import StoreMetrics
from flexkv_store.quota import (
    Admission,
    JsonQuotaState,
    QuotaManager,
    QuotaState,
    UserLRU,
    Victim,
)

__all__ = ["BlockingStore", "Store", "open_store"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class _L1:
    """Hot chunks in process memory, LRU-evicted within a byte capacity.

    A cache, not a tier of record: quotas never count it, and dropping an entry loses
    nothing that L2 does not hold.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._data: OrderedDict[ObjectKey, bytes] = OrderedDict()

    def get(self, key: ObjectKey) -> bytes | None:
        data = self._data.get(key)
        if data is not None:
            self._data.move_to_end(key)
        return data

    def __contains__(self, key: ObjectKey) -> bool:
        return key in self._data

    def put(self, key: ObjectKey, data: bytes) -> None:
        self.pop(key)
        if len(data) > self.capacity:
            return
        self._data[key] = data
        self.used += len(data)
        while self.used > self.capacity:
            _, old = self._data.popitem(last=False)
            self.used -= len(old)

    def pop(self, key: ObjectKey) -> bool:
        old = self._data.pop(key, None)
        if old is None:
            return False
        self.used -= len(old)
        return True

    def __len__(self) -> int:
        return len(self._data)


class Store:
    """KV chunks by :class:`ObjectKey`: L1 memory, L2 backends, UserLRU quotas, metrics.

    Build one with :func:`open_store` (from config) or directly from adapters. Use it as an
    async context manager, or call :meth:`open` (done on first use) and :meth:`close`.
    """

    def __init__(
        self,
        backends: Sequence[L2Adapter],
        *,
        l1_capacity_bytes: int = 0,
        lru: UserLRU | None = None,
        quotas: dict[str, int] | None = None,
        quota_state: QuotaState | None = None,
        metrics: bool = True,
        rebuild: bool = True,
    ) -> None:
        if not backends:
            raise ValueError("a store needs at least one L2 backend")
        self.backends = list(backends)
        self._labels = _backend_labels(self.backends)
        self._l1 = _L1(l1_capacity_bytes) if l1_capacity_bytes > 0 else None
        self.lru = lru if lru is not None else UserLRU()
        self._initial_quotas = dict(quotas or {})
        self._rebuild = rebuild
        self.metrics = (
            StoreMetrics(
                lambda: self.lru, lambda: list(zip(self._labels, self.backends, strict=True))
            )
            if metrics
            else None
        )
        self._salt_locks: dict[str, asyncio.Lock] = {}
        # Bumped by every delete and eviction: a read that overlapped one must not promote
        # (copy back into L1 or an earlier backend) what was just removed.
        self._removals = 0
        self._global_lock: asyncio.Lock | None = None
        self.quota = QuotaManager(
            self.lru, evict=self._evict, lock=self._all_writes_lock, state=quota_state
        )
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> Store:
        """Load quotas and rebuild the accounting from the backends' listings (once)."""
        if self._opened:
            return self
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("a Store is bound to the event loop that first used it")
        self._loop = loop
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._opened:
                return self
            if self._closed:
                raise RuntimeError("this store is closed")
            victims = await self.quota.load(self._initial_quotas)
            if self._rebuild:
                victims += await self._rebuild_accounting()
            await self._evict(victims)
            self._opened = True
        return self

    async def _rebuild_accounting(self) -> list[Victim]:
        found: dict[ObjectKey, ObjectInfo] = {}
        for backend, label in zip(self.backends, self._labels, strict=True):
            if not backend.capabilities.listing:
                continue
            try:
                async for info in backend.scan():
                    found.setdefault(info.key, info)
            except StorageError as exc:
                self._backend_failed(label, "scan", exc)
        # Oldest first, so the least recently written objects are evicted first.
        for info in sorted(found.values(), key=lambda i: i.last_modified):
            self.lru.record(info.key, info.size)
        victims = self.lru.enforce()
        if found:
            log.info("rebuilt accounting: %d objects, %d bytes", len(found), self.lru.total_bytes)
        return victims

    async def close(self) -> None:
        """Close every backend. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for backend in self.backends:
            try:
                await backend.aclose()
            except Exception as exc:  # one failing close must not leak the others
                log.warning("closing backend %s failed: %s", backend.name, exc)

    async def __aenter__(self) -> Store:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _ready(self) -> None:
        if not self._opened:
            await self.open()

    # -- locks -------------------------------------------------------------------------

    def _global(self) -> asyncio.Lock:
        if self._global_lock is None:
            self._global_lock = asyncio.Lock()
        return self._global_lock

    @contextlib.asynccontextmanager
    async def _write_lock(self, salts: Iterable[str]) -> AsyncIterator[None]:
        if self.lru.capacity is not None:
            async with self._global():
                yield
            return
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._global_shared())
            for salt in sorted(set(salts)):  # a fixed order: no deadlock between batches
                lock = self._salt_locks.get(salt)
                if lock is None:
                    lock = self._salt_locks[salt] = asyncio.Lock()
                await stack.enter_async_context(lock)
            yield

    @contextlib.asynccontextmanager
    async def _global_shared(self) -> AsyncIterator[None]:
        # Per-salt writers wait while a store-wide change (quota, capacity) holds the lock.
        lock = self._global()
        if lock.locked():
            async with lock:
                pass
        yield

    @contextlib.asynccontextmanager
    async def _all_writes_lock(self) -> AsyncIterator[None]:
        async with self._global():
            # The same (sorted) order as _write_lock, or the two can deadlock.
            locks = [self._salt_locks[s] for s in sorted(self._salt_locks)]
            async with contextlib.AsyncExitStack() as stack:
                for lock in locks:
                    await stack.enter_async_context(lock)
                yield

    # -- metrics helpers ---------------------------------------------------------------

    def _count(self, label: str, op: str, result: str, nbytes: int = 0) -> None:
        m = self.metrics
        if m is None:
            return
        m.operations.labels(label, op, result).inc()
        if nbytes:
            m.bytes.labels(label, op).inc(nbytes)

    def _observe(self, label: str, op: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.latency.labels(label, op).observe(time.perf_counter() - start)

    def _backend_failed(self, label: str, op: str, exc: BaseException) -> None:
        kind = "unavailable" if isinstance(exc, BackendUnavailableError) else "storage"
        if self.metrics is not None:
            self.metrics.backend_errors.labels(label, op, kind).inc()
        log.warning("backend %s: %s failed: %s", label, op, exc)

    # -- writes ------------------------------------------------------------------------

    async def put(self, key: ObjectKey, data: Buffer) -> None:
        """Store one chunk under its salt's quota (evicting that salt's LRU objects).

        Raises :class:`QuotaExceededError` (nothing written, nothing evicted) when the
        object alone exceeds the quota, and :class:`StorageError` when no backend took it.
        """
        await self.put_many([(key, data)])

    async def put_many(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> None:
        """Store several chunks: admitted together, written to each backend as one batch.

        If any object alone exceeds its quota, nothing is written or evicted. A key given
        twice keeps the last value.
        """
        await self._ready()
        batch: dict[ObjectKey, memoryview] = {}
        for key, data in items:
            batch[check_key(key)] = as_bytes_view(data)
        if not batch:
            return
        for key, view in batch.items():
            self._check_fits(key, view.nbytes)  # fail fast, before waiting for the lock
        start = time.perf_counter()
        async with self._write_lock(k.cache_salt for k in batch):
            # Again under the lock: a quota may have been lowered while we waited.
            for key, view in batch.items():
                self._check_fits(key, view.nbytes)
            admissions: list[Admission] = []
            pending: dict[ObjectKey, int] = {}
            doomed: list[Victim] = []
            evicted = False
            try:
                for key, view in batch.items():
                    adm = self.lru.admit(key, view.nbytes)
                    for victim in adm.victims:
                        # A key of this batch evicted by a later one is not written at all.
                        pending.pop(victim[0], None)
                        doomed.append(victim)
                    pending[key] = len(admissions)
                    admissions.append(adm)
                await self._evict(doomed)
                evicted = True
                to_write = [(k, batch[k]) for k in pending]
                if not await self._write_all(to_write):
                    raise StorageError(
                        f"no backend accepted the write of {len(to_write)} object(s); "
                        "see the log and flexkv_store_backend_errors for the cause"
                    )
            except BaseException:
                # Any failure (a backend error, a key a backend refuses, a cancelled task)
                # leaves the accounting as if the put never happened.
                undone: list[Victim] = []
                for adm in reversed(admissions):
                    undone += self.lru.rollback(adm)
                await self._evict(undone if evicted else undone + doomed)
                raise
        if self._l1 is not None:
            for key, view in to_write:
                self._l1.put(key, bytes(view))
        nbytes = sum(v.nbytes for _, v in to_write)
        self._count("store", "put", "ok", nbytes)
        self._observe("store", "put", start)

    def _check_fits(self, key: ObjectKey, size: int) -> None:
        """Refuse before any accounting changes, so a batch is all or nothing."""
        limit = self.lru.quota(key.cache_salt)
        cap = self.lru.capacity
        for bound in (limit, cap):
            # A zero limit admits nothing, not even an empty object (allowlist mode).
            if bound is not None and (size > bound or bound == 0):
                if self.metrics is not None:
                    self.metrics.quota_refusals.labels(key.cache_salt or "_default").inc()
                raise QuotaExceededError(key.cache_salt, size, bound)

    async def _write_all(self, items: list[tuple[ObjectKey, memoryview]]) -> bool:
        """Write to every backend at once; True if at least one took the whole batch."""

        async def one(backend: L2Adapter, label: str) -> bool:
            t0 = time.perf_counter()
            try:
                if len(items) == 1:
                    await backend.put(*items[0])
                else:
                    await backend.put_many(items)
            except StorageError as exc:
                self._backend_failed(label, "put", exc)
                return False
            self._count(label, "put", "ok", sum(v.nbytes for _, v in items))
            self._observe(label, "put", t0)
            return True

        results = await asyncio.gather(
            *(one(b, lbl) for b, lbl in zip(self.backends, self._labels, strict=True))
        )
        return any(results)

    async def _evict(self, victims: list[Victim]) -> None:
        """Delete objects the accounting already dropped, from every tier."""
        if not victims:
            return
        self._removals += 1
        keys = [k for k, _ in victims]
        if self._l1 is not None:
            for k in keys:
                self._l1.pop(k)
        for backend, label in zip(self.backends, self._labels, strict=True):
            try:
                await backend.delete_many(keys)
            except StorageError as exc:
                self._backend_failed(label, "evict", exc)
        self._count("store", "evict", "ok", sum(n for _, n in victims))

    async def delete(self, key: ObjectKey) -> bool:
        """Remove ``key`` from every tier; whether any held it."""
        return (await self.delete_many([key]))[0]

    async def delete_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Remove each key from every tier; whether each was held anywhere."""
        await self._ready()
        keys = [check_key(k) for k in keys]
        found = [False] * len(keys)
        async with self._write_lock(k.cache_salt for k in keys):
            self._removals += 1
            for i, k in enumerate(keys):
                if self.lru.remove(k) is not None:
                    found[i] = True
                if self._l1 is not None and self._l1.pop(k):
                    found[i] = True
            for backend, label in zip(self.backends, self._labels, strict=True):
                try:
                    res = await backend.delete_many(keys)
                except StorageError as exc:
                    self._backend_failed(label, "delete", exc)
                    continue
                found = [a or b for a, b in zip(found, res, strict=True)]
        self._count("store", "delete", "ok")
        return found

    # -- reads -------------------------------------------------------------------------

    def _hit(self, key: ObjectKey) -> None:
        self.lru.touch(key)

    async def get(self, key: ObjectKey) -> bytes | None:
        """The chunk stored under ``key``, or ``None`` (a miss, or every backend down)."""
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[ObjectKey]) -> list[bytes | None]:
        """Chunks of ``keys`` in order, ``None`` for each miss. One batch per backend."""
        await self._ready()
        keys = [check_key(k) for k in keys]
        start = time.perf_counter()
        removals = self._removals
        out: list[bytes | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        if self._l1 is not None:
            rest = []
            for i in todo:
                data = self._l1.get(keys[i])
                if data is None:
                    rest.append(i)
                else:
                    out[i] = data
                    self._count("l1", "get", "hit", len(data))
            todo = rest
        found_in: dict[int, int] = {}
        for b, (backend, label) in enumerate(zip(self.backends, self._labels, strict=True)):
            if not todo:
                break
            t0 = time.perf_counter()
            try:
                got = await backend.get_many([keys[i] for i in todo])
            except StorageError as exc:
                self._backend_failed(label, "get", exc)
                continue
            self._observe(label, "get", t0)
            rest = []
            for i, data in zip(todo, got, strict=True):
                if data is None:
                    rest.append(i)
                    self._count(label, "get", "miss")
                else:
                    out[i] = data
                    found_in[i] = b
                    self._count(label, "get", "hit", len(data))
            todo = rest
        for i, data in enumerate(out):
            if data is not None:
                self._hit(keys[i])
        await self._promote([(keys[i], out[i], b) for i, b in found_in.items()], removals)
        hits = sum(d is not None for d in out)
        if self.metrics is not None:
            self.metrics.operations.labels("store", "get", "hit").inc(hits)
            self.metrics.operations.labels("store", "get", "miss").inc(len(keys) - hits)
        self._observe("store", "get", start)
        return out

    async def _promote(
        self, found: list[tuple[ObjectKey, bytes | None, int]], removals: int
    ) -> None:
        """Copy hits into L1 and into the backends before the one that had them.

        Skipped when a delete or eviction ran during the read (it may have removed one of
        these keys); earlier backends only get keys the accounting tracks.
        """
        for key, data, b in found:
            if data is None or self._removals != removals:
                continue
            if self._l1 is not None:
                self._l1.put(key, data)
            if not self.lru.contains(key):
                continue
            for backend, label in zip(self.backends[:b], self._labels[:b], strict=True):
                try:
                    await backend.put(key, data)
                except StorageError as exc:
                    self._backend_failed(label, "promote", exc)

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        """Read ``key`` into the caller's writable buffer (pinned memory, an array).

        Returns the length, ``None`` on a miss; :class:`BufferTooSmallError` if it does
        not fit.
        """
        await self._ready()
        check_key(key)
        view = writable_view(out)
        removals = self._removals
        if self._l1 is not None:
            data = self._l1.get(key)
            if data is not None:
                if len(data) > view.nbytes:
                    raise BufferTooSmallError(len(data), view.nbytes)
                view[: len(data)] = data
                self._hit(key)
                self._count("l1", "get", "hit", len(data))
                self._count("store", "get", "hit", len(data))
                return len(data)
        for b, (backend, label) in enumerate(zip(self.backends, self._labels, strict=True)):
            try:
                n = await backend.get_into(key, view)
            except BufferTooSmallError:
                raise
            except StorageError as exc:
                self._backend_failed(label, "get", exc)
                continue
            if n is None:
                self._count(label, "get", "miss")
                continue
            self._count(label, "get", "hit", n)
            self._count("store", "get", "hit", n)
            self._hit(key)
            if self._l1 is not None or b > 0:
                await self._promote([(key, bytes(view[:n]), b)], removals)
            return n
        self._count("store", "get", "miss")
        return None

    async def contains(self, key: ObjectKey) -> bool:
        """Whether any tier holds ``key`` (does not count as a hit)."""
        return await self.lookup_prefix([key]) == 1

    async def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Whether each key is held by some tier: one batched query per backend."""
        await self._ready()
        keys = [check_key(k) for k in keys]
        found = [False] * len(keys)
        todo = list(range(len(keys)))
        if self._l1 is not None:
            todo = [i for i in todo if keys[i] not in self._l1]
            for i in set(range(len(keys))) - set(todo):
                found[i] = True
        for backend, label in zip(self.backends, self._labels, strict=True):
            if not todo:
                break
            try:
                res = await backend.exists_many([keys[i] for i in todo])
            except StorageError as exc:
                self._backend_failed(label, "exists", exc)
                continue
            for i, ok in zip(todo, res, strict=True):
                found[i] = found[i] or ok
            todo = [i for i in todo if not found[i]]
        return found

    async def lookup_prefix(self, keys: Sequence[ObjectKey]) -> int:
        """How many leading chunks of a request are stored (one batched query)."""
        found = await self.exists_many(keys)
        n = 0
        for ok in found:
            if not ok:
                break
            n += 1
        return n

    async def scan(
        self, model_name: str | None = None, cache_salt: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        """Every stored object (each key once, from the first backend that lists it)."""
        await self._ready()
        seen: set[ObjectKey] = set()
        for backend, label in zip(self.backends, self._labels, strict=True):
            if not backend.capabilities.listing:
                continue
            try:
                async for info in backend.scan(model_name=model_name, cache_salt=cache_salt):
                    if info.key not in seen:
                        seen.add(info.key)
                        yield info
            except StorageError as exc:
                self._backend_failed(label, "scan", exc)

    # -- blocks ------------------------------------------------------------------------

    async def put_blocks(
        self,
        keys: Sequence[ObjectKey],
        kv_caches: Sequence[Any],
        block_ids: Sequence[int] | Any,
        layout: str,
        *,
        block_size: int | None = None,
    ) -> None:
        """Gather paged KV blocks into chunk buffers and store them.

        Chunk ``i`` is ``keys[i]`` and covers ``block_ids[i*b:(i+1)*b]`` with
        ``b = len(block_ids) // len(keys)`` (which must divide exactly). ``block_size`` is
        needed only for the ``sglang`` layout, whose tensors do not show it.
        """
        from flexkv_store.transfer._store_glue import put_blocks

        await put_blocks(self, keys, kv_caches, block_ids, layout, block_size=block_size)

    async def get_blocks(
        self,
        keys: Sequence[ObjectKey],
        kv_caches: Sequence[Any],
        block_ids: Sequence[int] | Any,
        layout: str,
        *,
        block_size: int | None = None,
    ) -> int:
        """Load the leading chunks that exist and scatter them into the blocks.

        Stops at the first miss; returns how many chunks were loaded.
        """
        from flexkv_store.transfer._store_glue import get_blocks

        return await get_blocks(self, keys, kv_caches, block_ids, layout, block_size=block_size)

    # -- reporting ---------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Backends, tiers and totals, for ``/health`` and ``/api/usage`` (no secrets)."""
        return {
            "backends": [
                {"label": label, **backend.info()}
                for backend, label in zip(self.backends, self._labels, strict=True)
            ],
            "l1": None
            if self._l1 is None
            else {
                "capacity_bytes": self._l1.capacity,
                "used_bytes": self._l1.used,
                "objects": len(self._l1),
            },
            "total_bytes": self.lru.total_bytes,
            "total_objects": self.lru.total_objects,
            "capacity_bytes": self.lru.capacity,
            "default_quota_bytes": self.lru.default_quota,
            "quota_state": None if self.quota.state is None else self.quota.state.describe(),
        }

    def blocking(self) -> BlockingStore:
        """A facade with the same methods as plain calls, for engines calling from threads.

        It drives this store on a private event loop in a background thread; the store must
        not have been used on another loop.
        """
        if self._loop is not None:
            raise RuntimeError(
                "Store.blocking() needs a store that has not been used on an event loop yet"
            )
        return BlockingStore(self)


def _backend_labels(backends: Sequence[L2Adapter]) -> list[str]:
    labels = []
    for i, b in enumerate(backends):
        name = b.name or type(b).__name__
        labels.append(name if [x.name for x in backends].count(b.name) == 1 else f"{name}{i}")
    return labels


class BlockingStore:
    """The :class:`Store` API as blocking calls, run on a background event loop thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="flexkv-store-loop", daemon=True
        )
        self._thread.start()
        try:
            self._run(store.open())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("BlockingStore methods cannot be called from its own loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def put(self, key: ObjectKey, data: Buffer) -> None:
        self._run(self.store.put(key, data))

    def put_many(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> None:
        self._run(self.store.put_many(list(items)))

    def get(self, key: ObjectKey) -> bytes | None:
        return self._run(self.store.get(key))

    def get_many(self, keys: Sequence[ObjectKey]) -> list[bytes | None]:
        return self._run(self.store.get_many(keys))

    def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        return self._run(self.store.get_into(key, out))

    def contains(self, key: ObjectKey) -> bool:
        return self._run(self.store.contains(key))

    def delete(self, key: ObjectKey) -> bool:
        return self._run(self.store.delete(key))

    def lookup_prefix(self, keys: Sequence[ObjectKey]) -> int:
        return self._run(self.store.lookup_prefix(keys))

    def put_blocks(
        self,
        keys: Sequence[ObjectKey],
        kv_caches: Sequence[Any],
        block_ids: Any,
        layout: str,
        *,
        block_size: int | None = None,
    ) -> None:
        self._run(self.store.put_blocks(keys, kv_caches, block_ids, layout, block_size=block_size))

    def get_blocks(
        self,
        keys: Sequence[ObjectKey],
        kv_caches: Sequence[Any],
        block_ids: Any,
        layout: str,
        *,
        block_size: int | None = None,
    ) -> int:
        return self._run(
            self.store.get_blocks(keys, kv_caches, block_ids, layout, block_size=block_size)
        )

    def scan(
        self, model_name: str | None = None, cache_salt: str | None = None
    ) -> list[ObjectInfo]:
        async def collect() -> list[ObjectInfo]:
            return [i async for i in self.store.scan(model_name, cache_salt)]

        return self._run(collect())

    def set_quota(self, salt: str, limit_bytes: int) -> None:
        self._run(self.store.quota.set_quota(salt, limit_bytes))

    def delete_quota(self, salt: str) -> bool:
        return self._run(self.store.quota.delete_quota(salt))

    def get_quota(self, salt: str) -> int | None:
        return self.store.quota.get_quota(salt)

    def call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run any coroutine function against the store on its loop."""

        async def run() -> _T:
            return await fn()

        return self._run(run())

    def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        return self._run(self.store.exists_many(keys))

    def delete_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        return self._run(self.store.delete_many(keys))

    def info(self) -> dict[str, Any]:
        return self.store.info()

    def close(self) -> None:
        """Close the store and stop the loop thread. Idempotent."""
        if not self._loop.is_running():
            return
        try:
            self._run(self.store.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> BlockingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_quota_state(config: StoreConfig, backends: Sequence[L2Adapter]) -> QuotaState | None:
    """Where quotas persist: ``state_path``; a Redis hash when the first backend is Redis;
    next to the first fs backend's data; else ``./flexkv-quota.json`` when some backend is
    persistent, and nowhere for memory-only stores (whose data does not outlive them)."""
    if config.quota.state_path:
        return JsonQuotaState(config.quota.state_path)
    first = config.adapters[0]
    if isinstance(first, RedisConfig):
        from flexkv_store.quota._redis_state import RedisQuotaState

        return RedisQuotaState(backends[0])
    for cfg in config.adapters:
        if isinstance(cfg, FsConfig):
            return JsonQuotaState(Path(cfg.paths[0]) / "flexkv-quota.json")
    if not any(b.capabilities.persistent for b in backends):
        return None
    return JsonQuotaState("./flexkv-quota.json")


def open_store(config: str | Path | dict[str, Any] | StoreConfig | None = None) -> Store:
    """A :class:`Store` from a config file, dict, backend URL or :class:`StoreConfig`.

    ``None`` reads ``FLEXKV_STORE_CONFIG`` and the environment (default: an fs backend in
    ``./flexkv-cache``). Nothing is read from the backends until first use (or ``open``).
    """
    cfg = load_config(config)
    backends = [open_adapter(a) for a in cfg.adapters]
    lru = UserLRU(default_quota=cfg.quota.default_quota_bytes, capacity=cfg.quota.capacity_bytes)
    return Store(
        backends,
        l1_capacity_bytes=cfg.l1.capacity_bytes,
        lru=lru,
        quotas=cfg.quota.quotas,
        quota_state=default_quota_state(cfg, backends),
        metrics=cfg.metrics.enabled,
    )
