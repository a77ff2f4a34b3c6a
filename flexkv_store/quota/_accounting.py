"""The accounting contract: where usage, LRU order and quotas live (DESIGN sections 4, 13).

:class:`Accounting` is what the Store, the quota manager (and so the admin API), ``fsck``
and ``du`` talk to. Implementations:

* ``local`` (:class:`~flexkv_store.quota._local.LocalAccounting`): the in-memory
  :class:`~flexkv_store.quota.UserLRU` of one process, rebuilt from ``scan`` at start.
* ``sqlite`` (:class:`~flexkv_store.quota._sqlite.SqliteAccounting`): one SQLite database
  (WAL) shared by the processes of one node; every admission is one ``BEGIN IMMEDIATE``
  transaction, so the quota holds across processes.

The semantics are UserLRU's (section 4) whatever the implementation, and one conformance
suite (:mod:`flexkv_store.quota.testing`) checks them:

* :meth:`Accounting.admit` accounts a batch before it is written, atomically: it refuses
  objects that alone exceed their salt's quota (or the capacity), evicts the salt's least
  recently used *committed* objects (then, with a capacity, the globally least recently
  used) until the batch fits, and records the batch as *pending*. Pending objects count
  towards usage but are never chosen as victims: another process may still be writing them.
  At every moment ``usage(s) <= quota(s)`` in the accounting.
* The admitting process deletes the victims from the backends, writes, and then
  :meth:`Accounting.commit` (written) or :meth:`Accounting.rollback` (not written) each
  admission. A pending entry whose process died is found by :meth:`Accounting.reconcile`
  (``fsck``, ``quota.reconcile``) and settled against what the backends hold.
* Quotas are kept apart by source: *config* quotas (applied at every start from the config
  file) and *run-time* quotas (set through the admin API, persisted, and overriding the
  config for their salt until deleted). A change writes one salt.
"""

from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

from flexkv_store.keyformat import ObjectKey
from flexkv_store.quota._userlru import Admission, Tally, Victim

__all__ = ["Accounting", "Admitted", "QuotaSource", "Reconciled", "SaltReport", "Snapshot"]

#: Where a salt's effective quota comes from.
QuotaSource = Literal["runtime", "config", "default"]


class Reconciled(NamedTuple):
    """What :meth:`Accounting.reconcile` did."""

    #: pending entries whose object was found stored: committed at the stored size
    committed: int
    #: pending entries whose object was not found: forgotten
    forgotten: int
    #: what it evicted to keep each salt it touched within its quota (and the store within
    #: its capacity): mostly objects it adopted, or committed at a larger stored size.
    #: Already out of the accounting: the caller deletes them, as with any eviction.
    victims: list[Victim]


@dataclass(slots=True)
class Admitted:
    """What :meth:`Accounting.admit` decided for a batch.

    ``admissions`` are the items to write (in batch order); ``refused`` the items that are
    not written, with why: each alone exceeds its quota or a later item of the same batch
    evicted it (:class:`QuotaExceededError`), or another process is writing that key
    (:class:`StorageError`; that write settles it). ``victims`` left the accounting and
    must be deleted from the backends; ``never_stored`` are victims that only this batch
    had admitted (nothing to delete, no event to report).
    """

    admissions: list[Admission] = field(default_factory=list)
    refused: dict[ObjectKey, Exception] = field(default_factory=dict)
    victims: list[Victim] = field(default_factory=list)
    never_stored: set[ObjectKey] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class SaltReport:
    """One salt as the accounting knows it."""

    salt: str
    used: Tally
    evicted: Tally
    limit: int | None
    source: QuotaSource


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the metrics and ``info()`` show, read at one moment."""

    salts: tuple[SaltReport, ...]
    total: Tally
    evicted: Tally
    default_quota: int | None
    capacity: int | None
    taken_at: float = field(default_factory=time.time)


def new_owner() -> str:
    """Who makes pending admissions: ``host:pid`` first (reconcile tells a dead writer by
    them), then the start time and a random part that tell two accountings of one
    process apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}:{os.urandom(3).hex()}"


def owner_is_dead(owner: str) -> bool:
    """Whether the process that made a pending admission (``host:pid:started``) is known
    to be gone: on this host, no such pid (a pid reused since is taken as alive)."""
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class Accounting(ABC):
    """Usage, LRU order and quotas of one store (or of every process sharing its state).

    All methods but :meth:`touch`, :meth:`known` and :meth:`snapshot` may do I/O. Callers
    serialize writes of one salt within a process (the Store's write locks); across
    processes, each call is atomic on its own.
    """

    #: ``local``, ``sqlite``, ...
    kind: ClassVar[str]
    #: Whether other processes see this state (then a restart does not rebuild it from
    #: ``scan`` unless it is empty or ``reconcile`` asks to).
    shared: ClassVar[bool] = False

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:  # noqa: B027 - nothing to open in memory
        """Connect; create the state if it does not exist yet."""

    async def close(self) -> None:  # noqa: B027
        """Flush batched touches and release connections. Idempotent."""

    def describe(self) -> str:
        """Where the state lives, for logs and ``/health`` (no secrets)."""
        return self.kind

    # -- limits ------------------------------------------------------------------------

    @property
    @abstractmethod
    def default_quota(self) -> int | None:
        """Quota of salts without their own (None = unlimited, 0 = allowlist mode)."""

    @property
    @abstractmethod
    def capacity(self) -> int | None:
        """Byte limit of the whole store, or None."""

    @abstractmethod
    async def set_default_quota(self, limit: int | None) -> list[Victim]:
        """Change the default quota; evicts salts without their own quota down to it."""

    @abstractmethod
    async def set_capacity(self, limit: int | None) -> list[Victim]:
        """Change the capacity; evicts in global LRU order down to it."""

    @abstractmethod
    async def quota(self, salt: str) -> tuple[int | None, QuotaSource]:
        """The effective quota of ``salt`` and where it comes from."""

    @abstractmethod
    async def quotas(self) -> dict[str, tuple[int, QuotaSource]]:
        """Every salt with a quota of its own (run-time or config)."""

    @abstractmethod
    async def set_quota(self, salt: str, limit: int) -> list[Victim]:
        """Set a run-time quota (it overrides the config's for ``salt``); evicts down."""

    @abstractmethod
    async def delete_quota(self, salt: str) -> tuple[bool, list[Victim]]:
        """Drop the run-time quota of ``salt``; it falls back to its config quota, else the
        default. Whether one was set, and what fitting the fallback evicted."""

    @abstractmethod
    async def apply_config(self, quotas: Mapping[str, int]) -> list[Victim]:
        """Make ``quotas`` the config quotas (run-time ones still win for their salts)."""

    # -- objects -----------------------------------------------------------------------

    @abstractmethod
    async def admit(self, items: Sequence[tuple[ObjectKey, int]], *, each: bool) -> Admitted:
        """Account a batch before it is written (see the module docstring).

        Without ``each``, an item that alone exceeds its quota raises
        :class:`QuotaExceededError` and nothing changes; a key given twice counts once
        (its last size). With ``each``, such items are ``refused`` and the rest admitted.
        """

    def take_orphans(self) -> list[Victim]:
        """Victims a failed :meth:`admit` took out of the accounting and could not hand
        back in an :class:`Admitted` (a batch over several salts, refused or failed after
        earlier salts were admitted, whose undo had to evict): the caller deletes them, as
        any victims, whichever call it was. Empty where an admission is one atomic step."""
        return []

    @abstractmethod
    async def commit(self, admissions: Sequence[Admission]) -> None:
        """The admitted objects were written: they become ordinary (evictable) objects."""

    @abstractmethod
    async def rollback(self, admissions: Sequence[Admission]) -> list[Victim]:
        """The admitted objects were not written: undo their accounting (an overwrite gets
        its previous size back). No-op for an entry changed since. Returns what restoring
        a previous size evicted."""

    @abstractmethod
    async def abandon(self, admissions: Sequence[Admission]) -> None:
        """The admitted objects were written nowhere and their previous values deleted:
        forget the entries, unless another write changed them since."""

    @abstractmethod
    async def remove(self, keys: Sequence[ObjectKey], *, pending_too: bool = False) -> None:
        """Forget ``keys`` (deleted, or lost by every backend). An entry another process
        admitted and has not committed yet stays (its write may still land), unless
        ``pending_too`` (reconcile, for a writer that is gone)."""

    @abstractmethod
    async def restore(self, victims: Sequence[Victim]) -> None:
        """Account again victims a backend failed to delete (they are still stored)."""

    @abstractmethod
    async def record(self, items: Sequence[tuple[ObjectKey, int]]) -> None:
        """Track objects found by a scan, in LRU order (oldest first); never evicts."""

    async def adopt(self, items: Sequence[tuple[ObjectKey, int]]) -> list[Victim]:
        """Account objects a scan found stored that the accounting lacks (``items`` oldest
        first), then evict their salts down to their quotas and the store down to its
        capacity; returns the victims, for the caller to delete.

        A key accounted by then (in any state: another process may have admitted it since
        the scan) is left as it is. The shared accountings do it in one atomic step, with
        the adopted objects as the least recently used (those that do not fit are the
        first victims), so ``usage(s) <= quota(s)`` holds at every moment, also while
        another process adopts what it found. This default is for one process: it records
        what :meth:`contains` does not know (as :meth:`record` orders it) and calls
        :meth:`enforce`. A key given twice counts once, at its last size. Redis adopts
        per salt (one script per salt and 500 objects, each below every entry), so with
        a capacity the global order across salts is the reverse of their order in
        ``items``.
        """
        known = await self.contains([k for k, _ in items])
        await self.record([it for it, ok in zip(items, known, strict=True) if not ok])
        return await self.enforce()

    @abstractmethod
    async def enforce(self) -> list[Victim]:
        """Evict every salt down to its quota and the store down to its capacity."""

    @abstractmethod
    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Whether each key is accounted (pending or committed)."""

    def known(self, key: ObjectKey) -> bool | None:
        """A hint without I/O, safe from any thread: True / False when this process can tell
        (the local accounting), None when only :meth:`contains` can."""
        return None

    @abstractmethod
    def touch(self, keys: Iterable[ObjectKey]) -> None:
        """Mark keys most recently used (hits). May be batched: applied within
        ``touch_interval`` or at :meth:`flush`. Unknown keys are ignored."""

    async def flush(self) -> None:  # noqa: B027 - unbatched implementations
        """Apply batched touches now."""

    @abstractmethod
    async def usage(self, salt: str) -> Tally:
        """Bytes and objects accounted to ``salt`` (pending ones included)."""

    @abstractmethod
    async def evictions(self, salt: str) -> Tally:
        """Bytes and objects evicted from ``salt``."""

    @abstractmethod
    async def lru_order(self, salt: str | None = None) -> list[Victim]:
        """``(key, size)`` from least to most recently used: one salt's, or all."""

    @abstractmethod
    async def committed_versions(self, keys: Sequence[ObjectKey]) -> dict[ObjectKey, int]:
        """The admission versions of those of ``keys`` whose entries are committed (not
        pending). :meth:`abandon` of an admission with such a version removes the entry
        only if no write changed it since."""

    async def lru_order_of(self, keys: Sequence[ObjectKey]) -> list[Victim]:
        """``(key, size)`` of those of ``keys`` that are accounted."""
        wanted = set(keys)
        return [(k, n) for k, n in await self.lru_order() if k in wanted]

    @abstractmethod
    async def report(self) -> Snapshot:
        """Usage, quotas and evictions of every salt with a quota or objects."""

    def snapshot(self) -> Snapshot | None:
        """The last :meth:`report` (or the live state for the local accounting), without
        I/O: what metrics read at scrape time."""
        return None

    def peek(self, salt: str) -> SaltReport | None:
        """One salt from :meth:`snapshot` (live for the local accounting), without I/O;
        None when the salt has neither a quota nor objects (or no report was read)."""
        snap = self.snapshot()
        if snap is None:
            return None
        return next((r for r in snap.salts if r.salt == salt), None)

    @abstractmethod
    async def is_empty(self) -> bool:
        """Whether no object is accounted (a fresh shared state, rebuilt from ``scan``)."""

    @abstractmethod
    async def pending(self) -> list[tuple[ObjectKey, int, str, float, int]]:
        """Admissions not committed yet: ``(key, size, owner, admitted_at, version)``."""

    async def reconcile(self, present: Mapping[ObjectKey, int], *, older_than: float) -> Reconciled:
        """Settle pending admissions older than ``older_than`` seconds (or made by a process
        of this host that is gone) against ``present`` (what a scan found, oldest first):
        committed when the object exists, forgotten when not. Objects in ``present`` that
        are not accounted are adopted (:meth:`adopt`): those that do not fit their quota
        come back as victims, for the caller to delete. Deletes nothing itself."""
        now = time.time()
        done: list[Admission] = []
        stale: list[Admission] = []
        for key, _size, owner, at, version in await self.pending():
            if now - at < older_than and not owner_is_dead(owner):
                continue
            # Versioned: an entry a live writer replaced since is left to that writer.
            if key in present:
                done.append(Admission(key, present[key], None, [], version))
            else:
                stale.append(Admission(key, 0, None, [], version))
        victims = await self.commit_any(done) if done else []
        if stale:
            await self.abandon(stale)
        known = await self.contains(list(present))
        evicted = {k for k, _ in victims}  # by commit_any just now: not to be adopted again
        missing = [
            (k, n)
            for (k, n), ok in zip(present.items(), known, strict=True)
            if not ok and k not in evicted
        ]
        # adopt checks again, atomically: a key accounted since contains() is left alone
        if missing:
            victims += await self.adopt(missing)
        return Reconciled(len(done), len(stale), victims)

    async def commit_any(self, admissions: Sequence[Admission]) -> list[Victim]:
        """Commit pending entries of these versions whoever admitted them, at the sizes
        given (reconcile's use: the size found stored). A salt that a larger stored size
        takes over its quota is evicted down to it in the same atomic step: the victims,
        for the caller to delete. This default (one process: sizes as admitted) commits."""
        await self.commit(admissions)
        return []
