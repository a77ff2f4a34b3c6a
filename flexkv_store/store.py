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
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from flexkv_store._aio import ExceptionGroup, settle
from flexkv_store._bytes import bytes_of, copy_into
from flexkv_store._consistency import Generations, Suspects, WriteLocks
from flexkv_store._logs import Throttle
from flexkv_store._threads import off_loop
from flexkv_store.backends import L2Adapter, ObjectInfo, open_adapter
from flexkv_store.backends.base import Buffer, check_key, writable_view
from flexkv_store.backends.config import FsConfig, RedisConfig
from flexkv_store.config import StoreConfig, load_config
from flexkv_store.errors import (
    BackendUnavailableError,
    BufferTooSmallError,
    ConfigError,
    InvalidKeyError,
    QuotaExceededError,
    StorageError,
    StoreClosedError,
)
from flexkv_store.keyformat import ObjectKey, as_bytes_view
from flexkv_store.metrics import StoreMetrics
from flexkv_store.quota import (
    Accounting,
    Admission,
    JsonQuotaState,
    LocalAccounting,
    QuotaManager,
    QuotaState,
    SupersededError,
    UserLRU,
    Victim,
)

__all__ = ["BlockingStore", "Store", "open_store"]

log = logging.getLogger(__name__)

#: Bytes of chunk buffers a store keeps for block copies (allocated on demand, reused).
BLOCK_POOL_BYTES = 1 << 30
#: L1 copies at least this large run in a worker thread.
_L1_COPY_OFF_LOOP = 1 << 20
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

    #: Seconds between background retries of the deletes that suspect copies need.
    repair_interval: float = 1.0
    #: Age (seconds) after which a shared accounting's uncommitted admission is settled
    #: against a scan: its writer finished or died long ago.
    reconcile_after: float = 60.0

    def __init__(
        self,
        backends: Sequence[L2Adapter],
        *,
        l1_capacity_bytes: int = 0,
        lru: UserLRU | None = None,
        accounting: Accounting | None = None,
        quotas: dict[str, int] | None = None,
        quota_state: QuotaState | None = None,
        metrics: bool = True,
        rebuild: bool = True,
        reconcile: bool = False,
    ) -> None:
        if not backends:
            raise ValueError("a store needs at least one L2 backend")
        self.backends = list(backends)
        self._labels = _backend_labels(self.backends)
        self._l1 = _L1(l1_capacity_bytes) if l1_capacity_bytes > 0 else None
        if accounting is not None and lru is not None:
            raise ValueError("give a store either an accounting or a UserLRU, not both")
        #: Where usage, LRU order and quotas live (local, or shared between processes).
        self.accounting: Accounting = (
            accounting
            if accounting is not None
            else LocalAccounting(lru if lru is not None else UserLRU())
        )
        self._initial_quotas = dict(quotas or {})
        self._rebuild = rebuild
        self._reconcile = reconcile
        self.metrics = (
            StoreMetrics(
                self.accounting.snapshot,
                lambda: list(zip(self._labels, self.backends, strict=True)),
            )
            if metrics
            else None
        )
        self._locks = WriteLocks()
        self._gens = Generations()
        self._suspects = Suspects()
        self._last_repair = 0.0
        #: Chunk buffers of put_blocks/get_blocks (a transfer BufferPool), made on first use.
        self._block_pool: Any = None
        self._repair_task: asyncio.Task[None] | None = None
        self.quota = QuotaManager(
            self.accounting, evict=self._evict, lock=self._locks.exclusive, state=quota_state
        )
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Tasks inside a store call (a count: calls nest), and those close() cancelled.
        self._calls: Counter[asyncio.Task[Any]] = Counter()
        self._call_done: dict[asyncio.Task[Any], asyncio.Future[None]] = {}
        self._closing_cancelled: set[asyncio.Task[Any]] = set()
        # The store's own background tasks (promotions, repairs).
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[Callable[[str, list[ObjectKey]], None]] = []
        self._warn = Throttle(log)
        self.started_at = time.time()

    @property
    def lru(self) -> UserLRU:
        """The in-memory :class:`UserLRU` of a store with ``local`` accounting."""
        if isinstance(self.accounting, LocalAccounting):
            return self.accounting.lru
        raise TypeError(
            f"this store's accounting is {self.accounting.kind} (shared): use store.accounting"
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> Store:
        """Load quotas and rebuild the accounting from the backends' listings (once)."""
        if self._closed:
            raise StoreClosedError("this store is closed")
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
                raise StoreClosedError("this store is closed")
            await self.accounting.open()
            await settle(self._load_and_rebuild())
            self._opened = True
        return self

    async def _load_and_rebuild(self) -> None:
        """Quotas, the rebuild and the evictions they choose, as one settled step (victims
        leave a shared accounting at once; they must be deleted even if open is cancelled)."""
        victims = await self.quota.load(self._initial_quotas)
        if self._rebuild and (
            not self.accounting.shared or self._reconcile or await self.accounting.is_empty()
        ):
            victims += await self._rebuild_accounting()
        await self._evict(victims)

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
        ordered = sorted(found.values(), key=lambda i: i.last_modified)
        victims: list[Victim] = []
        if self.accounting.shared:
            # Other processes may be writing: settle only admissions old enough that their
            # writer is done or dead, and never forget an object that exists. What it
            # adopts is evicted down to the quota in the same step (another process may
            # have deleted or evicted an object since the scan: accounting it outside
            # that step took the salt over its quota until the enforce below).
            settled = await self.accounting.reconcile(
                {i.key: i.size for i in ordered}, older_than=self.reconcile_after
            )
            victims += settled.victims
        else:
            await self.accounting.record([(i.key, i.size) for i in ordered])
        victims += await self.accounting.enforce()
        if found:
            log.info("rebuilt accounting from a scan: %d objects", len(found))
        return victims

    async def close(self) -> None:
        """Fail the calls still in flight, then close every backend. Idempotent.

        Calls in flight raise :class:`StoreClosedError` once whatever they handed to a
        backend has finished (no buffer is used after they return); later calls raise it
        at once.
        """
        if self._closed:
            return
        self._closed = True
        me = asyncio.current_task()
        callers = [t for t in self._calls if t is not me and not t.done()]
        for task in callers:
            self._closing_cancelled.add(task)
            task.cancel()
        for task in self._tasks:
            task.cancel()
        # Wait for the store calls to end, not for the callers' tasks (an engine task goes
        # on after its call failed); shielded, so a cancelled close() still closes.
        waits = [self._call_done[t] for t in callers if t in self._call_done]
        waits += list(self._tasks)
        if waits:
            await asyncio.shield(asyncio.gather(*waits, return_exceptions=True))
        try:
            await self.accounting.close()
        except Exception as exc:
            log.warning("closing the accounting failed: %s", exc)
        for backend in self.backends:
            try:
                await backend.aclose()
            except Exception as exc:  # one failing close must not leak the others
                log.warning("closing backend %s failed: %s", backend.name, exc)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (or is running)."""
        return self._closed

    async def __aenter__(self) -> Store:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """Every public operation runs inside this: refuses a closed store, opens on first
        use, and turns close()'s cancellation of an in-flight call into StoreClosedError."""
        if self._closed:
            raise StoreClosedError("this store is closed")
        task = asyncio.current_task()
        assert task is not None
        self._calls[task] += 1
        if task not in self._call_done:
            self._call_done[task] = asyncio.get_running_loop().create_future()
        try:
            if not self._opened:
                await self.open()
            yield
        except asyncio.CancelledError:
            if task in self._closing_cancelled:
                uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
                if uncancel is not None:
                    uncancel()  # close() asked for it, not the task's owner
                raise StoreClosedError(
                    "the store was closed while this call was in flight"
                ) from None
            raise
        finally:
            left = self._calls[task] - 1
            if left:
                self._calls[task] = left
            else:
                del self._calls[task]
                self._closing_cancelled.discard(task)
                done = self._call_done.pop(task)
                if not done.done():
                    done.set_result(None)

    async def run_on_loop(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``fn()`` on the store's own event loop and await its result from any loop.

        What the admin API uses: its server's loop may not be the store's (a store driven
        by :meth:`blocking` runs on a thread of its own), and the store's locks and
        bookkeeping belong to one loop.
        """
        mine = self._loop
        if mine is None or mine is asyncio.get_running_loop():
            return await fn()
        if self._closed or mine.is_closed():
            raise StoreClosedError("this store is closed")

        async def run() -> _T:
            return await fn()

        try:
            fut = asyncio.run_coroutine_threadsafe(run(), mine)
        except RuntimeError as exc:  # the loop closed meanwhile
            raise StoreClosedError("this store is closed") from exc
        return await asyncio.wrap_future(fut)

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
        self._warn.warn(f"{label}:{op}", "backend %s: %s failed: %s", label, op, exc)

    def _write_lock(self, salts: Iterable[str]) -> contextlib.AbstractAsyncContextManager[None]:
        # With a global capacity any put may evict any salt's objects: one writer at a time.
        if self.accounting.capacity is not None:
            return self._locks.exclusive()
        return self._locks.salts(salts)

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
        twice keeps the last value. Raises :class:`StorageError` for the keys that no
        backend took (the others are stored and accounted). Returns, also when cancelled,
        only once no backend reads the given buffers any more; a cancelled or failed put
        may have stored some keys, and the accounting says which.
        """
        async with self._call():
            batch: dict[ObjectKey, memoryview] = {}
            for key, data in items:
                batch[check_key(key)] = as_bytes_view(data)
            if not batch:
                return
            for key, view in batch.items():
                self._check_fits(key, view.nbytes)  # fail fast, before waiting for the lock
            start = time.perf_counter()
            async with self._write_lock(k.cache_salt for k in batch):
                # From here on a cancellation waits for the writes and their bookkeeping.
                nbytes, failed = await settle(self._put_locked(batch, each=False))
            if failed:
                first = next(iter(failed))
                raise StorageError(
                    f"no backend accepted the write of {len(failed)} of {len(batch)} "
                    f"object(s) (first: {first.to_wire()}); the backends' errors are chained"
                ) from _group("put", [e for errs in failed.values() for e in errs])
            self._count("store", "put", "ok", nbytes)
            self._observe("store", "put", start)
        self._maybe_repair()

    async def put_each(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> list[Exception | None]:
        """Like :meth:`put_many`, but each item succeeds or fails on its own.

        Returns one outcome per item: ``None`` when it is stored and accounted, else the
        error: :class:`QuotaExceededError` for an object that alone exceeds its quota (the
        other items are still written), :class:`StorageError` when no backend took it.
        What an engine's offloading tier needs: a refusal fails only those keys. Bad keys
        still raise :class:`InvalidKeyError` before anything is written.
        """
        return await self._put_each(items, superseded_ok=False)

    async def _put_each(
        self, items: Iterable[tuple[ObjectKey, Buffer]], *, superseded_ok: bool
    ) -> list[Exception | None]:
        """:meth:`put_each`; with ``superseded_ok``, an item that a later item of the batch
        evicted is done (``None``, not counted as refused), as in :meth:`put_many`."""
        async with self._call():
            pairs = [(check_key(k), as_bytes_view(d)) for k, d in items]
            outcomes: list[Exception | None] = [None] * len(pairs)
            batch: dict[ObjectKey, memoryview] = {}
            where: dict[ObjectKey, list[int]] = {}
            for i, (key, view) in enumerate(pairs):
                try:
                    self._check_fits(key, view.nbytes)
                except QuotaExceededError as exc:
                    outcomes[i] = exc
                    continue
                batch[key] = view
                where.setdefault(key, []).append(i)
            if not batch:
                return outcomes
            start = time.perf_counter()
            try:
                async with self._write_lock(k.cache_salt for k in batch):
                    nbytes, failed = await settle(
                        self._put_locked(batch, each=True, superseded_ok=superseded_ok)
                    )
            except (StorageError, QuotaExceededError) as exc:  # the batch as a whole
                for idxs in where.values():
                    for i in idxs:
                        outcomes[i] = exc
                return outcomes
            for key, errs in failed.items():
                err: Exception
                if len(errs) == 1 and isinstance(errs[0], QuotaExceededError):
                    err = errs[0]
                else:
                    err = StorageError(f"no backend accepted the write of {key.to_wire()}")
                    err.__cause__ = _group("put", errs)
                for i in where[key]:
                    outcomes[i] = err
            self._count("store", "put", "ok", nbytes)
            self._observe("store", "put", start)
        self._maybe_repair()
        return outcomes

    async def _put_locked(
        self, batch: dict[ObjectKey, memoryview], *, each: bool, superseded_ok: bool = False
    ) -> tuple[int, dict[ObjectKey, list[Exception]]]:
        """Admit, evict, write and account ``batch``: the bytes stored and, per key stored
        nowhere, its errors. With ``each``, keys that do not fit are refused alone; with
        ``superseded_ok`` too, a key a later key of the batch evicted is no error."""
        acct = self.accounting
        # Under the lock again (a quota may have been lowered meanwhile), and atomically
        # for every process sharing the accounting.
        try:
            admitted = await acct.admit([(k, v.nbytes) for k, v in batch.items()], each=each)
        except QuotaExceededError as exc:
            self._count_refusal(exc)
            await self._evict(acct.take_orphans())
            raise
        except BaseException:
            await self._evict(acct.take_orphans())
            raise
        refused: dict[ObjectKey, list[Exception]] = {}
        for key, why in admitted.refused.items():
            if superseded_ok and isinstance(why, SupersededError):
                continue  # evicted, as any LRU victim is: its put is over
            if isinstance(why, QuotaExceededError):
                self._count_refusal(why)
            refused[key] = [why]
        admissions = admitted.admissions
        if not admissions:
            await self._evict(admitted.victims, unannounced=admitted.never_stored)
            return 0, refused
        # A superseded key that was new has nothing stored: its "eviction" is no event.
        failed = await self._evict(admitted.victims, unannounced=admitted.never_stored)
        if failed:
            # The victims are still stored (the evict put them back in the accounting);
            # writing on top would take the salt over its quota.
            await self._undo(admissions, [])
            raise StorageError(
                f"could not evict {len(failed)} object(s) to make room; nothing was written"
            ) from _group("evict", failed)
        to_write = [(a.key, batch[a.key]) for a in admissions]
        keys = [k for k, _ in to_write]
        self._gens.changed(keys)
        outcomes = await self._write_all(to_write)
        lost: list[ObjectKey] = []
        errors: dict[ObjectKey, list[Exception]] = {}
        cleanup: dict[int, list[ObjectKey]] = {}
        for i, key in enumerate(keys):
            failures = [(b, r[i]) for b, r in enumerate(outcomes) if r[i] is not None]
            for b, _ in failures:
                cleanup.setdefault(b, []).append(key)
            if len(failures) == len(self.backends):
                lost.append(key)
                errors[key] = [e for _, e in failures if e is not None]
        # A backend that failed a write may still hold the previous value (or, after a
        # timeout, the new one): remove it there, or keep it from being read.
        stuck = await self._delete_copies(cleanup, "put cleanup")
        keep: list[Admission] = []
        drop: list[Admission] = []
        for adm in admissions:
            if adm.key not in errors:
                keep.append(adm)
            elif any(self._suspects.at(b, adm.key) for b in range(len(self.backends))):
                self._suspects.orphans.add(adm.key)  # a copy may exist: keep it accounted
                keep.append(adm)
            else:
                drop.append(adm)  # its previous value was removed with it
        await acct.abandon(drop)
        await acct.commit(keep)
        self._gens.changed(keys)
        stored = 0
        for key, view in to_write:
            if key in errors:
                if self._l1 is not None:
                    self._l1.pop(key)
            else:
                stored += view.nbytes
                if self._l1 is not None:
                    self._l1.put(key, await _copied(view))
        if stuck:
            log.warning("%d stale copies could not be removed; they are not read", stuck)
        # For put_many, a key of the batch evicted by a later one of the same batch is
        # neither written nor lost: its put is over (evicted, as any LRU victim is);
        # put_each reports it (admitted.refused).
        return stored, {**refused, **errors}

    def _count_refusal(self, exc: QuotaExceededError) -> None:
        if self.metrics is not None:
            self.metrics.quota_refusals.labels(exc.cache_salt or "_default").inc()

    async def _undo(self, admissions: list[Admission], doomed: list[Victim]) -> None:
        """Roll admissions back before anything was written; delete what they evicted."""
        undone = await self.accounting.rollback(admissions)
        await self._evict(undone + doomed)

    def _check_fits(self, key: ObjectKey, size: int) -> None:
        """Refuse before waiting for the lock when the accounting can tell without I/O
        (admission checks again, atomically)."""
        if not isinstance(self.accounting, LocalAccounting):
            return
        limit, cap = self.accounting.quick_limits(key.cache_salt)
        for bound in (limit, cap):
            # A zero limit admits nothing, not even an empty object (allowlist mode).
            if bound is not None and (size > bound or bound == 0):
                exc = QuotaExceededError(key.cache_salt, size, bound)
                self._count_refusal(exc)
                raise exc

    async def _write_all(
        self, items: list[tuple[ObjectKey, memoryview]]
    ) -> list[list[Exception | None]]:
        """Write to every backend at once: per backend, one outcome per item."""

        async def one(b: int, backend: L2Adapter, label: str) -> list[Exception | None]:
            t0 = time.perf_counter()
            try:
                if len(items) == 1:
                    await backend.put(*items[0])
                    results: list[Exception | None] = [None]
                else:
                    results = await backend.put_each(items)
            except (StorageError, InvalidKeyError) as exc:
                results = [exc] * len(items)
            ok = 0
            for (key, view), r in zip(items, results, strict=True):
                if r is None:
                    ok += view.nbytes
                    self._suspects.good_copy(b, key)
                else:
                    self._backend_failed(label, "put", r)
            if ok:
                self._count(label, "put", "ok", ok)
            self._observe(label, "put", t0)
            return results

        return list(
            await asyncio.gather(
                *(
                    one(b, backend, label)
                    for b, (backend, label) in enumerate(
                        zip(self.backends, self._labels, strict=True)
                    )
                )
            )
        )

    async def _delete_copies(self, where: dict[int, list[ObjectKey]], op: str) -> int:
        """Delete keys from the given backends; what fails is marked suspect (not read).

        Returns how many copies could not be removed.
        """
        stuck = 0

        async def one(b: int, keys: list[ObjectKey]) -> None:
            nonlocal stuck
            try:
                await self.backends[b].delete_many(keys)
            except StorageError as exc:
                self._backend_failed(self._labels[b], op, exc)
                for key in keys:
                    self._suspects.add(b, key)
                stuck += len(keys)
                return
            gone = [key for key in keys if self._suspects.removed(b, key)]
            if gone:
                await self.accounting.remove(gone)  # their last suspect copies are gone

        await asyncio.gather(*(one(b, keys) for b, keys in where.items() if keys))
        return stuck

    async def _evict(
        self, victims: list[Victim], *, unannounced: set[ObjectKey] | None = None
    ) -> list[StorageError]:
        """Delete objects the accounting already dropped, from every tier.

        A victim some backend failed to delete is still stored: it goes back into the
        accounting (so usage stays what the backends hold), is not read there, and is
        deleted again by :meth:`repair`. Returns the backends' errors.
        """
        if not victims:
            return []
        keys = [k for k, _ in victims]
        self._gens.changed(keys)
        self._drop_from_l1(keys)
        _, errors, failed = await self._delete_everywhere(keys, "evict")
        self._drop_from_l1(keys)  # a read may have promoted one meanwhile
        still = [(key, size) for key, size in victims if key in failed]
        if still:
            await self.accounting.restore(still)
            self._suspects.orphans.update(k for k, _ in still)
        self._gens.changed(keys)
        self._count("store", "evict", "ok", sum(n for k, n in victims if k not in failed))
        quiet = unannounced or set()
        self._notify("evicted", [k for k in keys if k not in failed and k not in quiet])
        return errors

    def _drop_from_l1(self, keys: Iterable[ObjectKey]) -> None:
        if self._l1 is not None:
            for k in keys:
                self._l1.pop(k)

    async def _delete_everywhere(
        self, keys: list[ObjectKey], op: str
    ) -> tuple[list[bool], list[StorageError], set[ObjectKey]]:
        """Delete ``keys`` from every backend at once: whether some backend held each, the
        backends' errors, and the keys a backend may still hold (marked suspect there)."""
        errors: list[StorageError] = []
        failed: set[ObjectKey] = set()

        async def one(b: int, backend: L2Adapter, label: str) -> list[bool]:
            try:
                res = await backend.delete_many(keys)
            except StorageError as exc:
                self._backend_failed(label, op, exc)
                errors.append(exc)
                for k in keys:
                    self._suspects.add(b, k)
                failed.update(keys)
                return [False] * len(keys)
            for k in keys:
                self._suspects.removed(b, k)
            return res

        results = await asyncio.gather(
            *(
                one(b, backend, label)
                for b, (backend, label) in enumerate(zip(self.backends, self._labels, strict=True))
            )
        )
        held = [any(col) for col in zip(*results, strict=True)] if results else []
        return held, errors, failed

    async def delete(self, key: ObjectKey) -> bool:
        """Remove ``key`` from every tier; whether any held it."""
        return (await self.delete_many([key]))[0]

    async def delete_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Remove each key from every tier; whether each was held anywhere.

        Raises :class:`StorageError` (chained to the backends' errors) if a backend failed
        to delete: the keys then read as misses, stay accounted while a copy may remain,
        and are deleted again by :meth:`repair`.
        """
        async with self._call():
            keys = [check_key(k) for k in keys]
            async with self._write_lock(k.cache_salt for k in keys):
                found, errors = await settle(self._delete_locked(keys))
            self._count("store", "delete", "ok" if not errors else "error")
        self._maybe_repair()
        if errors:
            raise StorageError(
                f"delete: {len(errors)} backend(s) failed; the keys read as misses and the "
                "deletes are retried"
            ) from _group("delete", errors)
        return found

    async def _delete_locked(self, keys: list[ObjectKey]) -> tuple[list[bool], list[StorageError]]:
        self._gens.changed(keys)
        found = await self.accounting.contains(keys)
        for i, k in enumerate(keys):
            if self._l1 is not None and self._l1.pop(k):
                found[i] = True
        if self.accounting.shared:
            # Out of the shared accounting first, as an eviction does: a put of the key in
            # another process after this point is accounted afresh, and one that lands
            # before the backends' delete is lost with it (accounted, not stored: the safe
            # side). The other order could drop the accounting of an object just written.
            sizes = dict(await self.accounting.lru_order_of(keys))
            await self.accounting.remove(keys)
        held, errors, failed = await self._delete_everywhere(keys, "delete")
        self._drop_from_l1(keys)  # a read may have promoted one meanwhile
        found = [a or b for a, b in zip(found, held, strict=True)]
        for k in keys:
            if k in failed:
                self._suspects.orphans.add(k)  # still accounted while a copy may exist
            else:
                self._suspects.orphans.discard(k)
        if self.accounting.shared:
            await self.accounting.restore(
                [(k, sizes[k]) for k in keys if k in failed and k in sizes]
            )
        else:
            await self.accounting.remove([k for k in keys if k not in failed])
        self._gens.changed(keys)
        self._notify(
            "deleted", [k for k, f in zip(keys, found, strict=True) if f and k not in failed]
        )
        return found, errors

    # -- listeners ---------------------------------------------------------------------

    def add_listener(self, fn: Callable[[str, list[ObjectKey]], None]) -> None:
        """Call ``fn(event, keys)`` on the store's loop when objects leave the store.

        ``event`` is ``"evicted"`` (quota or capacity eviction, also one a quota change
        caused), ``"deleted"`` (:meth:`delete_many`) or ``"missing"`` (the accounting
        tracked objects that every backend then answered as absent, e.g. after a backend
        lost its data; they are forgotten). An engine tier turns these into its own events
        (vLLM's KV events); ``fn`` must not block. Exceptions it raises are logged.
        """
        self._listeners.append(fn)

    def _notify(self, event: str, keys: list[ObjectKey]) -> None:
        if not keys:
            return
        for fn in list(self._listeners):
            try:
                fn(event, keys)
            except Exception:  # a listener never breaks a store operation
                log.exception("store listener failed on %s", event)

    # -- repair ------------------------------------------------------------------------

    @property
    def suspect_copies(self) -> int:
        """Copies a backend failed to write or delete, not read until repaired."""
        return len(self._suspects)

    async def repair(self) -> int:
        """Delete the suspect copies again; returns how many are left.

        Runs by itself (at most every :attr:`repair_interval` seconds) after writes and
        deletes while suspect copies exist.
        """
        async with self._call():
            return await self._repair()

    async def _repair(self) -> int:
        self._last_repair = time.monotonic()
        if not self._suspects:
            return 0
        async with self._locks.exclusive():
            await settle(self._repair_locked())
        return len(self._suspects)

    async def _repair_locked(self) -> None:
        where = {b: self._suspects.keys_at(b) for b in range(len(self.backends))}
        keys = {k for ks in where.values() for k in ks}
        self._gens.changed(keys)
        await self._delete_copies(where, "repair")
        self._gens.changed(keys)

    def _maybe_repair(self) -> None:
        if not self._suspects:
            return
        if self._closed or time.monotonic() - self._last_repair < self.repair_interval:
            return
        if self._repair_task is not None and not self._repair_task.done():
            return
        self._last_repair = time.monotonic()
        self._repair_task = asyncio.get_running_loop().create_task(self._background_repair())
        self._tasks.add(self._repair_task)
        self._repair_task.add_done_callback(self._tasks.discard)

    async def _background_repair(self) -> None:
        try:
            await self._repair()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a repair is retried; it must never crash the engine
            log.warning("repair of suspect copies failed: %s", exc)

    # -- reads -------------------------------------------------------------------------

    def _hit(self, key: ObjectKey) -> None:
        self.accounting.touch((key,))

    def touch(self, keys: Iterable[ObjectKey]) -> None:
        """Mark ``keys`` recently used, as a hit would (no I/O; on the store's loop).

        For hits an engine served from its own caches: they keep the chunks from being
        the first evicted. Keys the store does not track are ignored.
        """
        self.accounting.touch(keys)

    async def get(self, key: ObjectKey) -> bytes | None:
        """The chunk stored under ``key``, or ``None`` (a miss, or every backend down)."""
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[ObjectKey]) -> list[bytes | None]:
        """Chunks of ``keys`` in order, ``None`` for each miss. One batch per backend."""
        async with self._call():
            keys = [check_key(k) for k in keys]
            stamp = self._gens.begin()
            try:
                return await self._get_many(keys, stamp)
            finally:
                self._gens.end(stamp)

    async def _get_many(self, keys: list[ObjectKey], stamp: int) -> list[bytes | None]:
        start = time.perf_counter()
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
            ask = [i for i in todo if not self._suspects.at(b, keys[i])]
            if not ask:
                continue
            t0 = time.perf_counter()
            try:
                got = await backend.get_many([keys[i] for i in ask])
            except Exception as exc:  # any backend failure is a miss, never the engine's
                self._backend_failed(label, "get", exc)
                continue
            self._observe(label, "get", t0)
            for i, data in zip(ask, got, strict=True):
                if data is None:
                    self._count(label, "get", "miss")
                elif self._suspects.at(b, keys[i]):
                    pass  # a write or delete failed there while we read: not trusted
                else:
                    out[i] = data
                    found_in[i] = b
                    self._count(label, "get", "hit", len(data))
            todo = [i for i in todo if out[i] is None]
        for i, data in enumerate(out):
            if data is not None:
                self._hit(keys[i])
        await self._promote([(keys[i], out[i], b) for i, b in found_in.items()], stamp)
        hits = sum(d is not None for d in out)
        if self.metrics is not None:
            self.metrics.operations.labels("store", "get", "hit").inc(hits)
            self.metrics.operations.labels("store", "get", "miss").inc(len(keys) - hits)
        self._observe("store", "get", start)
        return out

    async def _promote(self, found: list[tuple[ObjectKey, bytes | None, int]], stamp: int) -> None:
        """Copy hits into L1 and into the backends before the one that had them.

        Only keys that no write, delete or eviction touched since the read began (their
        change stamps say so); backend copies are written under the salt's write lock, so
        no put or delete of the key interleaves, and only for keys the accounting tracks.
        """
        later: list[tuple[ObjectKey, bytes, int]] = []
        for key, data, b in found:
            if data is None or not self._gens.unchanged(key, stamp):
                continue
            if self._l1 is not None:
                self._l1.put(key, data)
            if b > 0 and self.accounting.known(key) is not False:
                later.append((key, data, b))  # checked again under the lock
        if not later:
            return
        # In the background: the read has its data and must not wait for a write lock (or
        # for a slow earlier backend). The task keeps the read's stamp alive meanwhile.
        self._gens.hold(stamp)
        self._background(self._promote_later(later, stamp))

    async def _promote_later(self, items: list[tuple[ObjectKey, bytes, int]], stamp: int) -> None:
        try:
            async with self._write_lock(k.cache_salt for k, _, _ in items):
                await self._promote_locked(items, stamp)
        except Exception as exc:  # best effort: a promotion never fails anything
            log.warning("promotion failed: %s", exc)
        finally:
            self._gens.end(stamp)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self) -> None:
        """Wait until background work (promotions into earlier backends, repairs) is done."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _promote_locked(self, items: list[tuple[ObjectKey, bytes, int]], stamp: int) -> None:
        tracked = await self.accounting.contains([k for k, _, _ in items])
        for (key, data, b), ok in zip(items, tracked, strict=True):
            if not ok or not self._gens.unchanged(key, stamp):
                continue
            for e, (backend, label) in enumerate(
                zip(self.backends[:b], self._labels[:b], strict=True)
            ):
                try:
                    await backend.put(key, data)
                except (StorageError, InvalidKeyError) as exc:
                    self._backend_failed(label, "promote", exc)
                else:
                    self._suspects.good_copy(e, key)

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        """Read ``key`` into the caller's writable buffer (pinned memory, an array).

        Returns the length, ``None`` on a miss; :class:`BufferTooSmallError` if it does
        not fit.
        """
        async with self._call():
            check_key(key)
            view = writable_view(out)
            stamp = self._gens.begin()
            try:
                return await self._get_into(key, view, stamp)
            finally:
                self._gens.end(stamp)

    async def _get_into(self, key: ObjectKey, view: memoryview, stamp: int) -> int | None:
        if self._l1 is not None:
            data = self._l1.get(key)
            if data is not None:
                if len(data) > view.nbytes:
                    raise BufferTooSmallError(len(data), view.nbytes)
                await _copy_into(view, data)
                self._hit(key)
                self._count("l1", "get", "hit", len(data))
                self._count("store", "get", "hit", len(data))
                return len(data)
        answered = 0  # backends that said "absent" (not down, not suspect)
        for b, (backend, label) in enumerate(zip(self.backends, self._labels, strict=True)):
            if self._suspects.at(b, key):
                continue
            try:
                n = await backend.get_into(key, view)
            except BufferTooSmallError:
                raise
            except Exception as exc:  # any backend failure is a miss, never the engine's
                self._backend_failed(label, "get", exc)
                continue
            if n is None or self._suspects.at(b, key):
                answered += n is None
                self._count(label, "get", "miss")
                continue
            self._count(label, "get", "hit", n)
            self._count("store", "get", "hit", n)
            self._hit(key)
            if self._l1 is not None or b > 0:
                await self._promote([(key, await _copied(view[:n]), b)], stamp)
            return n
        self._count("store", "get", "miss")
        if answered == len(self.backends) and self.accounting.known(key) is not False:
            self._gens.hold(stamp)
            self._background(self._forget_later([key], stamp))
        return None

    async def _forget_shared(self, keys: list[ObjectKey], stamp: int) -> list[ObjectKey]:
        """The shared-accounting form: another process may be writing the key, so take the
        committed entries' versions, ask the backends again, and forget only entries whose
        version is still the one seen before that second miss (a write in between changes
        it; a write still in flight is pending, and pending entries are not taken)."""
        acct = self.accounting
        versions = await acct.committed_versions(
            [k for k in keys if self._gens.unchanged(k, stamp) and k not in self._suspects.orphans]
        )
        if not versions:
            return []
        ask = list(versions)
        answered = await self._exists_many(ask)
        lost = [k for k, n in zip(ask, answered, strict=True) if n == len(self.backends)]
        await acct.abandon([Admission(k, 0, None, [], versions[k]) for k in lost])
        return lost

    async def _forget_later(self, keys: list[ObjectKey], stamp: int) -> None:
        """Drop from the accounting keys that every backend answered as absent.

        Under the salts' write locks, and only keys no put, delete or eviction touched since
        the read began: a put still writing the key holds the lock, and one that finished
        meanwhile stamped it.
        """
        try:
            async with self._write_lock(k.cache_salt for k in keys):
                if self.accounting.shared:
                    gone = await self._forget_shared(keys, stamp)
                else:
                    tracked = await self.accounting.contains(keys)
                    gone = [
                        k
                        for k, ok in zip(keys, tracked, strict=True)
                        if ok and self._gens.unchanged(k, stamp) and k not in self._suspects.orphans
                    ]
                    await self.accounting.remove(gone)
                if gone:
                    log.info("forgot %d object(s) that no backend holds any more", len(gone))
                    self._notify("missing", gone)
        except Exception as exc:  # bookkeeping only: never fails a read
            log.warning("forgetting missing objects failed: %s", exc)
        finally:
            self._gens.end(stamp)

    async def contains(self, key: ObjectKey) -> bool:
        """Whether any tier holds ``key`` (does not count as a hit)."""
        return await self.lookup_prefix([key]) == 1

    async def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Whether each key is held by some tier: one batched query per backend.

        Keys the accounting tracks but every backend answers as absent are forgotten (as
        :meth:`get_into` does): a backend lost them.
        """
        async with self._call():
            keys = [check_key(k) for k in keys]
            stamp = self._gens.begin()
            try:
                return self._exists_result(keys, await self._exists_many(keys), stamp)
            finally:
                self._gens.end(stamp)

    async def _exists_many(self, keys: list[ObjectKey]) -> list[int]:
        """Per key: -1 when some tier holds it, else how many backends said "absent"."""
        answered = [0] * len(keys)
        todo = list(range(len(keys)))
        if self._l1 is not None:
            for i in todo:
                if keys[i] in self._l1:
                    answered[i] = -1
            todo = [i for i in todo if answered[i] >= 0]
        for b, (backend, label) in enumerate(zip(self.backends, self._labels, strict=True)):
            ask = [i for i in todo if not self._suspects.at(b, keys[i])]
            if not ask:
                continue
            try:
                res = await backend.exists_many([keys[i] for i in ask])
            except Exception as exc:  # any backend failure is a miss
                self._backend_failed(label, "exists", exc)
                continue
            for i, ok in zip(ask, res, strict=True):
                if ok and not self._suspects.at(b, keys[i]):
                    answered[i] = -1
                elif not ok:
                    answered[i] += 1
            todo = [i for i in todo if answered[i] >= 0]
        return answered

    def _exists_result(self, keys: list[ObjectKey], answered: list[int], stamp: int) -> list[bool]:
        lost = [
            k
            for k, n in zip(keys, answered, strict=True)
            if n == len(self.backends) and self.accounting.known(k) is not False
        ]
        if lost:
            self._gens.hold(stamp)
            self._background(self._forget_later(lost, stamp))
        return [n < 0 for n in answered]

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
        if self._closed:
            raise StoreClosedError("this store is closed")
        await self.open()
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

        The gathers run in a worker thread, never on the event loop, and the gather of one
        chunk overlaps the writes of the chunks before it (a few chunks in flight, bounded
        by the buffer pool). Each write takes every chunk gathered by then as one
        :meth:`put_each` batch, each chunk admitted on its own; a chunk that a later chunk
        of the call evicts is no error (as if it had been written first). A store whose
        only backend lends memory (:meth:`L2Adapter.lend`, the memory adapter) gathers
        host caches straight into it. Raises the error of the first chunk stored nowhere
        (:class:`QuotaExceededError` for a chunk that alone exceeds its quota, else
        :class:`StorageError`) after every chunk has finished; what a write raises
        instead of reporting (:class:`StoreClosedError`) ends the call at once.
        """
        from flexkv_store.transfer._pipeline import BlockCopier

        async with self._call():
            ks = [check_key(k) for k in keys]
            copier = BlockCopier(
                self._blocks_pool(), kv_caches, block_ids, layout, len(ks), block_size=block_size
            )
            # A lone backend that keeps payloads in its own memory lends it: the blocks
            # are gathered straight into the stored object, one copy instead of two.
            lender = (
                self.backends[0]
                if len(self.backends) == 1 and self._l1 is None and copier.host_caches
                else None
            )

            first = lender.lend(copier.chunk_nbytes) if lender is not None else None
            if lender is None or first is None:
                errors = await self._put_gathered(ks, copier)
            else:
                errors = await self._put_lent(ks, copier, lender, first)
            for err in errors:
                if err is not None:
                    raise err

    async def _put_lent(
        self, keys: list[ObjectKey], copier: Any, lender: L2Adapter, first: memoryview
    ) -> list[BaseException | None]:
        """Gather each chunk straight into memory that ``lender`` lends (``first`` for
        chunk 0) and put it there, ``copier.depth`` chunks at a time; one error (or
        ``None``) per key. A chunk it does not lend takes the pooled path."""
        slots = asyncio.Semaphore(copier.depth)

        async def one(i: int) -> None:
            async with slots:
                lent = first if i == 0 else lender.lend(copier.chunk_nbytes)
                if lent is None:
                    (err,) = await self._put_gathered([keys[i]], copier, start=i)
                    if err is not None:
                        raise err
                    return
                try:
                    await copier.gather_into(i, copier.wrap(lent))
                    await self.put_many([(keys[i], lent)])
                finally:
                    lender.unlend(lent)

        try:
            results = await asyncio.gather(
                *(one(i) for i in range(len(keys))), return_exceptions=True
            )
        finally:
            lender.unlend(first)  # if chunk 0 never ran (a no-op once adopted or back)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def _put_gathered(
        self, keys: list[ObjectKey], copier: Any, *, start: int = 0
    ) -> list[BaseException | None]:
        """Gather chunks ``start``, ``start + 1``, ... (``keys``) into pooled buffers and
        store them; one error (or ``None``) per key.

        One task gathers the chunks in order, holding at most ``copier.write_depth``
        buffers (gathered or being written). Whenever the previous write is done, every
        chunk gathered by then goes out as one batch: the writes of one salt hold its write
        lock one after another, so only a batch keeps several chunks' I/O in flight (one
        chunk per call measured 0.6-0.66x of the fs adapter's ``put_many`` of the same
        buffers). A chunk that a later chunk of its batch evicted is done, as it would be
        had it been written first.
        """
        errors: list[BaseException | None] = [None] * len(keys)
        ready: list[tuple[int, Any]] = []  # gathered, not yet written
        room = asyncio.Semaphore(copier.write_depth)
        arrived = asyncio.Event()  # a chunk is ready, or the gatherer is over
        over = False

        async def gather_all() -> None:
            try:
                for i in range(len(keys)):
                    await room.acquire()
                    try:
                        buf = await copier.gather(start + i)
                    except Exception as exc:  # the copy failed: this chunk only
                        errors[i] = exc
                        room.release()
                    else:
                        ready.append((i, buf))
                    arrived.set()
            finally:
                arrived.set()

        def drop_ready() -> None:
            while ready:
                copier.release(ready.pop()[1])

        gatherer = asyncio.ensure_future(gather_all())
        # Whatever the gatherer still holds when this call is over goes back (a stopped
        # gather hands its own buffer back; the callback is a safety net).
        gatherer.add_done_callback(lambda _: drop_ready() if over else None)
        try:
            while True:
                if not ready:
                    if gatherer.done():
                        gatherer.result()  # what the gatherer raised, if anything
                        return errors
                    arrived.clear()
                    await arrived.wait()
                    continue
                batch = sorted(ready, key=lambda r: r[0])  # the chunks' order
                ready.clear()
                try:
                    outcomes = await self._put_each(
                        [(keys[i], buf) for i, buf in batch], superseded_ok=True
                    )
                finally:
                    for _, buf in batch:
                        copier.release(buf)
                        room.release()
                for (i, _), outcome in zip(batch, outcomes, strict=True):
                    errors[i] = outcome
        finally:
            over = True
            gatherer.cancel()
            drop_ready()
            await asyncio.gather(gatherer, return_exceptions=True)

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

        Stops at the first chunk that is missing (or whose size does not match the caches'
        layout, e.g. another dtype), so the caller recomputes from there; returns how many
        chunks were loaded. Blocks after the loaded ones are never written. Reads run a few
        chunks ahead of the scatters, which run in a worker thread, never on the loop.
        """
        from flexkv_store.transfer._pipeline import BlockCopier

        async with self._call():
            ks = [check_key(k) for k in keys]
            copier = BlockCopier(
                self._blocks_pool(), kv_caches, block_ids, layout, len(ks), block_size=block_size
            )
            present = await self.lookup_prefix(ks)
            loaded, stopped = 0, False
            if len(self.backends) == 1 and self._l1 is None and copier.host_caches:
                loaded, stopped = await self._scatter_borrowed(ks[:present], copier)
            if stopped:
                return loaded
            return await self._load_chunks(ks[:present], copier, loaded)

    async def _scatter_borrowed(self, keys: list[ObjectKey], copier: Any) -> tuple[int, bool]:
        """Scatter the leading chunks straight from a lone backend's memory (one copy, not
        two; :meth:`L2Adapter.borrow`). Returns the chunks loaded and whether the load is
        over (a mismatch); the pooled path takes over from where it left off otherwise."""
        backend, label = self.backends[0], self._labels[0]
        for i, key in enumerate(keys):
            if self._suspects.at(0, key):
                return i, False
            try:
                lease = backend.borrow(key)
            except Exception:  # the pooled path asks again, and counts a failure once
                return i, False
            if lease is None:
                return i, False
            try:
                n = lease.view.nbytes
                if n != copier.chunk_nbytes:
                    _log_mismatch(key, n, copier.chunk_nbytes)
                    return i, True
                await copier.scatter(i, copier.wrap(lease.view))
            finally:
                lease.release()
            self._count(label, "get", "hit", n)
            self._count("store", "get", "hit", n)
            self._hit(key)
        return len(keys), False

    async def _load_chunks(self, keys: list[ObjectKey], copier: Any, start: int = 0) -> int:
        """Read ``keys[start:]`` in order into pooled buffers and scatter each; stop at a
        mismatch. Returns how many of ``keys`` are loaded (``start`` already are)."""

        async def read(i: int) -> tuple[Any, int | None]:
            buf = await copier.buffer()
            try:
                try:
                    n = await self.get_into(keys[i], buf)
                except BufferTooSmallError as exc:
                    n = exc.needed  # larger than the layout's chunk: a mismatch below
            except BaseException:
                copier.release(buf)
                raise
            return buf, n

        window: collections.deque[asyncio.Task[tuple[Any, int | None]]] = collections.deque()
        started = loaded = start
        try:
            while loaded < len(keys):
                while started < len(keys) and len(window) < copier.depth:
                    window.append(asyncio.ensure_future(read(started)))
                    started += 1
                # The read stays in the window until it is taken: cancelled while it
                # completes, this call still hands its buffer back below.
                await asyncio.wait([window[0]])
                buf, n = window.popleft().result()
                try:
                    if n != copier.chunk_nbytes:
                        if n is not None:
                            _log_mismatch(keys[loaded], n, copier.chunk_nbytes)
                        break
                    await copier.scatter(loaded, buf)
                    loaded += 1
                finally:
                    copier.release(buf)
        finally:
            # Reads still in flight (after a miss, an error or a cancellation): stopped, and
            # the buffers of those that finished anyway handed back, at once or when they
            # finish (a stopped read hands its own back; the callback is a safety net).
            def give_back(task: asyncio.Future[tuple[Any, int | None]]) -> None:
                if not task.cancelled() and task.exception() is None:
                    copier.release(task.result()[0])

            for task in window:
                if task.done():
                    give_back(task)
                else:
                    task.add_done_callback(give_back)
                    task.cancel()
            await asyncio.gather(*window, return_exceptions=True)
        return loaded

    def _blocks_pool(self) -> Any:
        """The chunk buffer pool of put_blocks/get_blocks, made on first use."""
        if self._block_pool is None:
            from flexkv_store.transfer._pool import BufferPool

            self._block_pool = BufferPool(BLOCK_POOL_BYTES)
        return self._block_pool

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
            **self._totals(),
            "suspect_copies": len(self._suspects),
            "quota_state": None if self.quota.state is None else self.quota.state.describe(),
        }

    def _totals(self) -> dict[str, Any]:
        snap = self.accounting.snapshot()
        return {
            "total_bytes": None if snap is None else snap.total.nbytes,
            "total_objects": None if snap is None else snap.total.objects,
            "capacity_bytes": self.accounting.capacity,
            "default_quota_bytes": self.accounting.default_quota,
            "accounting": self.accounting.describe(),
        }

    async def refresh(self) -> None:
        """Read a shared accounting's figures for :meth:`info` and the metrics (a no-op
        for the local accounting, whose figures are always current)."""
        async with self._call():
            if self.accounting.shared:
                await self.accounting.report()

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


async def _copied(view: memoryview) -> bytes:
    """``bytes(view)``, copied in a worker thread when large (never stalling the loop)."""
    if view.nbytes < _L1_COPY_OFF_LOOP:
        return bytes(view)
    data: bytes = await settle(off_loop(bytes_of, view))
    return data


def _log_mismatch(key: ObjectKey, n: int, needed: int) -> None:
    log.warning(
        "chunk %s has %s bytes, the caches' layout needs %d: not loaded", key.to_wire(), n, needed
    )


async def _copy_into(view: memoryview, data: bytes) -> None:
    """``view[:len(data)] = data``, in a worker thread when large."""
    if len(data) < _L1_COPY_OFF_LOOP:
        view[: len(data)] = data
    else:
        await settle(off_loop(copy_into, view, data))


def _group(what: str, errors: Sequence[BaseException]) -> BaseException:
    """The cause to chain: the one error, or an ExceptionGroup of several."""
    if len(errors) == 1:
        return errors[0]
    excs = [e if isinstance(e, Exception) else RuntimeError(repr(e)) for e in errors]
    group: BaseException = ExceptionGroup(f"{what}: {len(excs)} backend errors", excs)
    return group


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
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._pending_lock = threading.Lock()
        self._stopped = False
        self._thread.start()
        try:
            self._run(store.open())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("BlockingStore methods cannot be called from its own loop")
        with self._pending_lock:
            if self._stopped:
                coro.close()
                raise StoreClosedError("this store is closed")
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._pending.add(fut)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            if self._stopped:  # never started: the loop stopped first
                raise StoreClosedError("the store was closed while this call was waiting") from None
            raise
        finally:
            with self._pending_lock:
                self._pending.discard(fut)

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
        return self.call(lambda: _now(self.store.quota.get_quota, salt))

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
        return self.call(lambda: _now(self.store.info))

    def repair(self) -> int:
        return self._run(self.store.repair())

    def close(self) -> None:
        """Close the store and stop the loop thread. Idempotent.

        Calls other threads still have in flight raise :class:`StoreClosedError`.
        """
        if self._stopped:
            return
        try:
            self._run(self.store.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        with self._pending_lock:
            if self._stopped:
                return
            self._stopped = True
            pending = list(self._pending)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        for fut in pending:
            fut.cancel()  # submitted but never run: their callers get StoreClosedError
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> BlockingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _now(fn: Callable[..., _T], *args: Any) -> _T:
    """A plain call as a coroutine, to run it on the store's loop (its bookkeeping is not
    safe to read from another thread while the loop changes it)."""
    return fn(*args)


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
    return Store(
        backends,
        l1_capacity_bytes=cfg.l1.capacity_bytes,
        accounting=accounting_for(cfg),
        quotas=cfg.quota.quotas,
        quota_state=default_quota_state(cfg, backends),
        metrics=cfg.metrics.enabled,
        reconcile=cfg.quota.reconcile,
    )


def accounting_for(config: StoreConfig) -> Accounting:
    """The accounting ``quota.accounting`` names (not opened yet)."""
    q = config.quota
    if q.accounting == "local":
        return LocalAccounting(
            UserLRU(default_quota=q.default_quota_bytes, capacity=q.capacity_bytes)
        )
    if q.accounting == "redis" or ("://" in q.accounting and not q.accounting.startswith("sqlite")):
        from flexkv_store.quota._redis_acct import RedisAccounting

        if q.accounting == "redis":
            rcfg = next((a for a in config.adapters if isinstance(a, RedisConfig)), None)
            if rcfg is None:
                raise ConfigError(
                    "quota.accounting 'redis' uses the first Redis backend's server, and this "
                    "store has none: give a URL ('redis://host:6379/0')"
                )
        else:
            rcfg = RedisConfig.from_url(q.accounting)
        return RedisAccounting(
            rcfg,
            default_quota=q.default_quota_bytes,
            capacity=q.capacity_bytes,
            touch_interval=q.touch_interval_ms / 1000,
        )
    from flexkv_store.quota._sqlite import SqliteAccounting

    if q.accounting.startswith("sqlite:///"):
        path = Path(q.accounting[len("sqlite://") :])
    else:
        fs = next((a for a in config.adapters if isinstance(a, FsConfig)), None)
        if fs is None:
            raise ConfigError(
                "quota.accounting 'sqlite' puts its database next to the first fs backend's "
                "data, and this store has none: give a path ('sqlite:///var/lib/flexkv/acct.db')"
            )
        path = Path(fs.paths[0]) / "flexkv-accounting.sqlite"
    return SqliteAccounting(
        path,
        default_quota=q.default_quota_bytes,
        capacity=q.capacity_bytes,
        touch_interval=q.touch_interval_ms / 1000,
    )
