"""``quota.accounting: sqlite``: one SQLite database shared by the processes of a node.

Every state change is one ``BEGIN IMMEDIATE`` transaction (SQLite's single writer), so an
admission — quota check, choice of victims, their removal and the new entry — is atomic
across processes: ``used(s) <= quota(s)`` holds in the database at every commit. WAL mode
lets readers go on while one process writes; ``synchronous=NORMAL`` (a crash of the
machine may lose the last transactions, never corrupt the file; the next ``reconcile``
settles the accounting against the backends).

Tables: ``objects`` (wire key, salt, size, LRU clock, admission version, owner while
pending), ``salts`` (usage, evictions, run-time and config quotas), ``meta`` (the LRU clock
and totals). One change writes the rows it concerns, never the whole state.

Calls run on one worker thread per process (the connection lives there); touches are
batched and applied every ``touch_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from flexkv_store.errors import (
    ConcurrentWriteError,
    ConfigError,
    QuotaExceededError,
    StorageError,
)
from flexkv_store.keyformat import ObjectKey, check_cache_salt
from flexkv_store.quota._accounting import (
    Accounting,
    Admitted,
    QuotaSource,
    SaltReport,
    Snapshot,
    new_owner,
)
from flexkv_store.quota._local import superseded_error
from flexkv_store.quota._userlru import Admission, Tally, Victim

__all__ = ["SqliteAccounting"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,
    salt TEXT NOT NULL,
    size INTEGER NOT NULL,
    used_at INTEGER NOT NULL,
    version INTEGER NOT NULL,
    owner TEXT,
    admitted_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_salt_lru ON objects (salt, used_at);
CREATE INDEX IF NOT EXISTS objects_lru ON objects (used_at);
CREATE INDEX IF NOT EXISTS objects_pending ON objects (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS salts (
    salt TEXT PRIMARY KEY,
    used INTEGER NOT NULL DEFAULT 0,
    objects INTEGER NOT NULL DEFAULT 0,
    evicted_bytes INTEGER NOT NULL DEFAULT 0,
    evicted_objects INTEGER NOT NULL DEFAULT 0,
    runtime_quota INTEGER,
    config_quota INTEGER,
    pend INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('clock', 0), ('total_bytes', 0), ('total_objects', 0),
    ('evicted_bytes', 0), ('evicted_objects', 0), ('pend', 0), ('format', 1);
"""


def _refuses(size: int, limit: int | None) -> bool:
    return limit is not None and (size > limit or limit == 0)


#: How long processes opening one new database together may wait for each other.
_OPEN_WAIT_S = 60.0


def _switch_to_wal(db: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, waiting out other processes that open the same new
    database at the same moment.

    Switching the journal mode needs an exclusive lock, and SQLite answers "database is
    locked" at once, without its busy handler, when another connection holds a lock it
    would otherwise deadlock with. That happens when several processes create the file
    together, so the switch is retried for up to ``_OPEN_WAIT_S``.
    """
    deadline = time.monotonic() + _OPEN_WAIT_S
    delay = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class SqliteAccounting(Accounting):
    """Accounting in one SQLite database (WAL), shared by the processes of one node."""

    kind: ClassVar[str] = "sqlite"
    shared: ClassVar[bool] = True

    def __init__(
        self,
        path: str | Path,
        *,
        default_quota: int | None = None,
        capacity: int | None = None,
        touch_interval: float = 0.1,
    ) -> None:
        self.path = Path(path)
        self._default = default_quota
        self._capacity = capacity
        self._touch_interval = touch_interval
        self._owner = new_owner()
        self._exec: concurrent.futures.ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._touched: dict[ObjectKey, None] = {}
        self._touch_task: asyncio.Task[None] | None = None
        self._snapshot: Snapshot | None = None
        self._closed = False

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    # -- plumbing ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._exec is not None:
            return
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flexkv-sqlite")
        await self._run(self._connect)
        self._touch_task = asyncio.get_running_loop().create_task(self._touch_loop())

    def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            _switch_to_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            cols = {r[1] for r in db.execute("PRAGMA table_info(salts)")}
            if "pend" not in cols:  # a database of an earlier version
                db.execute("ALTER TABLE salts ADD COLUMN pend INTEGER NOT NULL DEFAULT 0")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"quota.accounting: cannot open {self.path}: {exc}") from exc
        self._db = db

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._exec is None:
            raise StorageError("the sqlite accounting is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._exec, fn, *args)
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite accounting {self.path}: {exc}") from exc

    def _tx(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in one write transaction (on the worker thread)."""
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._touch_task is not None:
            self._touch_task.cancel()
            try:
                await self._touch_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._exec is not None:
            try:
                await self.flush()
            finally:
                db, self._db = self._db, None
                if db is not None:
                    await asyncio.get_running_loop().run_in_executor(self._exec, db.close)
                self._exec.shutdown(wait=True)
                self._exec = None

    # -- limits (helpers run in a transaction) -----------------------------------------

    def _limit(self, db: sqlite3.Connection, salt: str) -> tuple[int | None, QuotaSource]:
        row = db.execute(
            "SELECT runtime_quota, config_quota FROM salts WHERE salt = ?", (salt,)
        ).fetchone()
        if row is not None and row[0] is not None:
            return int(row[0]), "runtime"
        if row is not None and row[1] is not None:
            return int(row[1]), "config"
        return self._default, "default"

    @staticmethod
    def _meta(db: sqlite3.Connection, k: str) -> int:
        return int(db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()[0])

    @staticmethod
    def _bump(db: sqlite3.Connection, k: str, n: int) -> None:
        db.execute("UPDATE meta SET v = v + ? WHERE k = ?", (n, k))

    def _tick(self, db: sqlite3.Connection, n: int = 1) -> int:
        """Advance the LRU clock by ``n``; the first of the new values."""
        clock = self._meta(db, "clock")
        db.execute("UPDATE meta SET v = ? WHERE k = 'clock'", (clock + n,))
        return clock + 1

    @staticmethod
    def _ensure_salt(db: sqlite3.Connection, salt: str) -> None:
        db.execute("INSERT OR IGNORE INTO salts (salt) VALUES (?)", (salt,))

    def _unpend(self, db: sqlite3.Connection, salt: str, size: int) -> None:
        db.execute("UPDATE salts SET pend = pend - ? WHERE salt = ?", (size, salt))
        self._bump(db, "pend", -size)

    def _drop(self, db: sqlite3.Connection, key: str, salt: str, size: int) -> None:
        row = db.execute("SELECT owner FROM objects WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] is not None:
            self._unpend(db, salt, size)
        db.execute("DELETE FROM objects WHERE key = ?", (key,))
        db.execute(
            "UPDATE salts SET used = used - ?, objects = objects - 1 WHERE salt = ?", (size, salt)
        )
        self._bump(db, "total_bytes", -size)
        self._bump(db, "total_objects", -1)

    def _evict_rows(
        self, db: sqlite3.Connection, rows: list[tuple[str, str, int]], victims: list[Victim]
    ) -> None:
        for key, salt, size in rows:
            self._drop(db, key, salt, size)
            db.execute(
                "UPDATE salts SET evicted_bytes = evicted_bytes + ?, "
                "evicted_objects = evicted_objects + 1 WHERE salt = ?",
                (size, salt),
            )
            self._bump(db, "evicted_bytes", size)
            self._bump(db, "evicted_objects", 1)
            victims.append((ObjectKey.from_wire(key), size))

    def _used(self, db: sqlite3.Connection, salt: str) -> int:
        row = db.execute("SELECT used FROM salts WHERE salt = ?", (salt,)).fetchone()
        return 0 if row is None else int(row[0])

    def _shrink_salt(
        self, db: sqlite3.Connection, salt: str, budget: int, since: int, victims: list[Victim]
    ) -> bool:
        """Evict ``salt``'s least recently used evictable objects (committed, or admitted
        by this transaction: version >= ``since``) until it uses at most ``budget``.
        Whether it got there (entries pending in other processes are never victims)."""
        while self._used(db, salt) > budget:
            rows = db.execute(
                "SELECT key, salt, size FROM objects WHERE salt = ? AND "
                "(owner IS NULL OR version >= ?) ORDER BY used_at LIMIT 64",
                (salt, since),
            ).fetchall()
            if not rows:
                return False
            used = self._used(db, salt)
            take = []
            for key, s, size in rows:
                if used <= budget:
                    break
                take.append((key, s, int(size)))
                used -= int(size)
            self._evict_rows(db, take, victims)
        return True

    def _shrink_total(
        self, db: sqlite3.Connection, budget: int, since: int, victims: list[Victim]
    ) -> bool:
        while self._meta(db, "total_bytes") > budget:
            rows = db.execute(
                "SELECT key, salt, size FROM objects WHERE owner IS NULL OR version >= ? "
                "ORDER BY used_at LIMIT 64",
                (since,),
            ).fetchall()
            if not rows:
                return False
            total = self._meta(db, "total_bytes")
            take = []
            for key, s, size in rows:
                if total <= budget:
                    break
                take.append((key, s, int(size)))
                total -= int(size)
            self._evict_rows(db, take, victims)
        return True

    def _fit_salt(self, db: sqlite3.Connection, salt: str, victims: list[Victim]) -> None:
        limit, _ = self._limit(db, salt)
        if limit is not None:
            self._shrink_salt(db, salt, limit if limit else -1, 1 << 62, victims)

    # -- limits ------------------------------------------------------------------------

    @property
    def default_quota(self) -> int | None:
        return self._default

    @property
    def capacity(self) -> int | None:
        return self._capacity

    async def set_default_quota(self, limit: int | None) -> list[Victim]:
        self._default = limit
        return await self.enforce()

    async def set_capacity(self, limit: int | None) -> list[Victim]:
        self._capacity = limit
        return await self.enforce()

    async def quota(self, salt: str) -> tuple[int | None, QuotaSource]:
        def read() -> tuple[int | None, QuotaSource]:
            assert self._db is not None
            return self._limit(self._db, salt)

        return await self._run(read)

    async def quotas(self) -> dict[str, tuple[int, QuotaSource]]:
        def read() -> dict[str, tuple[int, QuotaSource]]:
            assert self._db is not None
            out: dict[str, tuple[int, QuotaSource]] = {}
            for salt, rt, cfg in self._db.execute(
                "SELECT salt, runtime_quota, config_quota FROM salts "
                "WHERE runtime_quota IS NOT NULL OR config_quota IS NOT NULL"
            ):
                out[salt] = (int(rt), "runtime") if rt is not None else (int(cfg), "config")
            return out

        return await self._run(read)

    async def set_quota(self, salt: str, limit: int) -> list[Victim]:
        salt = check_cache_salt(salt)

        def change(db: sqlite3.Connection) -> list[Victim]:
            self._ensure_salt(db, salt)
            db.execute("UPDATE salts SET runtime_quota = ? WHERE salt = ?", (int(limit), salt))
            victims: list[Victim] = []
            self._fit_salt(db, salt, victims)
            return victims

        return await self._run(self._tx, change)

    async def delete_quota(self, salt: str) -> tuple[bool, list[Victim]]:
        salt = check_cache_salt(salt)

        def change(db: sqlite3.Connection) -> tuple[bool, list[Victim]]:
            row = db.execute("SELECT runtime_quota FROM salts WHERE salt = ?", (salt,)).fetchone()
            if row is None or row[0] is None:
                return False, []
            db.execute("UPDATE salts SET runtime_quota = NULL WHERE salt = ?", (salt,))
            victims: list[Victim] = []
            self._fit_salt(db, salt, victims)
            return True, victims

        return await self._run(self._tx, change)

    async def apply_config(self, quotas: Mapping[str, int]) -> list[Victim]:
        checked = {check_cache_salt(s): int(n) for s, n in quotas.items()}
        for salt, n in checked.items():
            if n < 0:
                raise ConfigError(f"quota of {salt!r} must be >= 0 bytes")

        def change(db: sqlite3.Connection) -> list[Victim]:
            db.execute("UPDATE salts SET config_quota = NULL WHERE config_quota IS NOT NULL")
            for salt, n in checked.items():
                self._ensure_salt(db, salt)
                db.execute("UPDATE salts SET config_quota = ? WHERE salt = ?", (n, salt))
            victims: list[Victim] = []
            for (salt,) in db.execute("SELECT salt FROM salts").fetchall():
                self._fit_salt(db, salt, victims)
            return victims

        return await self._run(self._tx, change)

    # -- objects -----------------------------------------------------------------------

    async def admit(self, items: Sequence[tuple[ObjectKey, int]], *, each: bool) -> Admitted:
        batch: dict[ObjectKey, int] = {}
        for key, size in items:
            batch[key] = int(size)
        return await self._run(self._tx, lambda db: self._admit(db, batch, each))

    def _admit(self, db: sqlite3.Connection, batch: dict[ObjectKey, int], each: bool) -> Admitted:
        out = Admitted()
        cap = self._capacity
        limits: dict[str, int | None] = {}
        pend: dict[str, int] = {}
        gpend = self._meta(db, "pend") if cap is not None else 0
        # Every check before any change (as the Redis script does): a refused item must
        # leave its key's previous entry and the other objects alone.
        for key, size in batch.items():
            salt = key.cache_salt
            if salt not in limits:
                limits[salt] = self._limit(db, salt)[0]
                row_p = db.execute("SELECT pend FROM salts WHERE salt = ?", (salt,)).fetchone()
                pend[salt] = 0 if row_p is None else int(row_p[0])
            row = db.execute(
                "SELECT size, owner FROM objects WHERE key = ?", (key.to_wire(),)
            ).fetchone()
            mine = int(row[0]) if row is not None and row[1] is not None else 0
            exc: Exception | None = None
            if row is not None and row[1] is not None and row[1] != self._owner:
                exc = ConcurrentWriteError(
                    f"{key.to_wire()} is being written by another process (its write settles it)"
                )
            for bound in (limits[salt], cap):
                if exc is None and _refuses(size, bound):
                    assert bound is not None
                    exc = QuotaExceededError(salt, size, bound)
            for bound, pending in ((limits[salt], pend[salt]), (cap, gpend)):
                if exc is None and bound is not None and size + pending - mine > bound:
                    exc = QuotaExceededError(
                        salt,
                        size,
                        bound,
                        detail="the quota is taken by writes in flight in other processes",
                    )
            if exc is not None:
                if not each:
                    raise exc
                out.refused[key] = exc
        since = self._meta(db, "clock") + 1  # versions of this transaction start here
        now = time.time()
        admitted: dict[ObjectKey, Admission] = {}
        for key, size in batch.items():
            if key in out.refused:
                continue
            salt = key.cache_salt
            wire = key.to_wire()
            self._ensure_salt(db, salt)
            prev = db.execute("SELECT size, owner FROM objects WHERE key = ?", (wire,)).fetchone()
            previous = None
            if prev is not None:
                previous = int(prev[0]) if prev[1] is None else None
                self._drop(db, wire, salt, int(prev[0]))
            limit = limits[salt]
            victims: list[Victim] = []
            room = True
            if limit is not None:
                room = self._shrink_salt(db, salt, limit - size, since, victims)
            if room and cap is not None:
                room = self._shrink_total(db, cap - size, since, victims)
            for j, (vkey, _) in enumerate(victims):
                popped = admitted.pop(vkey, None)
                if popped is not None and each:
                    out.refused[vkey] = superseded_error(vkey, batch[vkey], limits[vkey.cache_salt])
                if popped is not None and popped.previous_size is None:
                    out.never_stored.add(vkey)
                elif popped is not None and popped.previous_size is not None:
                    # nothing of this batch was written yet: what is stored is the value
                    # it replaced, and that is what a failed delete would account again
                    victims[j] = (vkey, popped.previous_size)
            out.victims += victims
            if not room:
                # The rest of the quota is taken by writes still in flight elsewhere.
                bound = limit if limit is not None else cap
                exc = QuotaExceededError(
                    salt,
                    size,
                    bound if bound is not None else 0,
                    detail="the quota is taken by writes in flight in other processes",
                )
                if not each:
                    raise exc
                out.refused[key] = exc
                continue
            version = self._tick(db)
            db.execute(
                "INSERT INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)",
                (wire, salt, size, version, version, self._owner, now),
            )
            db.execute(
                "UPDATE salts SET used = used + ?, objects = objects + 1, pend = pend + ? "
                "WHERE salt = ?",
                (size, size, salt),
            )
            self._bump(db, "total_bytes", size)
            self._bump(db, "total_objects", 1)
            self._bump(db, "pend", size)
            admitted[key] = Admission(key, size, previous, victims, version)
        out.admissions = list(admitted.values())
        return out

    async def commit(self, admissions: Sequence[Admission]) -> None:
        if not admissions:
            return
        rows = [(a.key.to_wire(), a.key.cache_salt, a._version) for a in admissions]

        def change(db: sqlite3.Connection) -> None:
            for wire, salt, version in rows:
                row = db.execute(
                    "SELECT size FROM objects WHERE key = ? AND version = ? AND owner IS NOT NULL",
                    (wire, version),
                ).fetchone()
                if row is None:
                    continue  # changed since: not this admission's entry any more
                db.execute(
                    "UPDATE objects SET owner = NULL, admitted_at = NULL WHERE key = ?", (wire,)
                )
                self._unpend(db, salt, int(row[0]))

        await self._run(self._tx, change)

    async def commit_any(self, admissions: Sequence[Admission]) -> list[Victim]:
        """Commit pending entries whoever admitted them, at the size found stored; a salt a
        larger size takes over its quota is evicted down to it in the same transaction."""
        rows = [(a.key.to_wire(), a.key.cache_salt, a.size, a._version) for a in admissions]

        def change(db: sqlite3.Connection) -> list[Victim]:
            grown: dict[str, None] = {}
            for wire, salt, size, version in rows:
                row = db.execute(
                    "SELECT size FROM objects WHERE key = ? AND version = ? AND owner IS NOT NULL",
                    (wire, version),
                ).fetchone()
                if row is None:
                    continue  # changed since reconcile looked: a live writer settles it
                self._unpend(db, salt, int(row[0]))
                db.execute(
                    "UPDATE objects SET owner = NULL, admitted_at = NULL, size = ? WHERE key = ?",
                    (size, wire),
                )
                diff = size - int(row[0])
                db.execute("UPDATE salts SET used = used + ? WHERE salt = ?", (diff, salt))
                self._bump(db, "total_bytes", diff)
                if diff > 0:
                    grown[salt] = None
            victims: list[Victim] = []
            if grown:
                for salt in grown:
                    self._fit_salt(db, salt, victims)
                if self._capacity is not None:
                    cap = self._capacity if self._capacity else -1
                    self._shrink_total(db, cap, 1 << 62, victims)
            return victims

        return await self._run(self._tx, change)

    async def rollback(self, admissions: Sequence[Admission]) -> list[Victim]:
        if not admissions:
            return []

        def change(db: sqlite3.Connection) -> list[Victim]:
            victims: list[Victim] = []
            for adm in reversed(admissions):
                wire = adm.key.to_wire()
                row = db.execute(
                    "SELECT size, version FROM objects WHERE key = ?", (wire,)
                ).fetchone()
                if row is None or int(row[1]) != adm._version:
                    continue
                salt = adm.key.cache_salt
                self._drop(db, wire, salt, int(row[0]))
                if adm.previous_size is not None:
                    version = self._tick(db)
                    db.execute(
                        "INSERT INTO objects VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                        (wire, salt, adm.previous_size, version, version),
                    )
                    db.execute(
                        "UPDATE salts SET used = used + ?, objects = objects + 1 WHERE salt = ?",
                        (adm.previous_size, salt),
                    )
                    self._bump(db, "total_bytes", adm.previous_size)
                    self._bump(db, "total_objects", 1)
                    self._fit_salt(db, salt, victims)
            return victims

        return await self._run(self._tx, change)

    async def abandon(self, admissions: Sequence[Admission]) -> None:
        if not admissions:
            return
        rows = [(a.key.to_wire(), a.key.cache_salt, a._version) for a in admissions]

        def change(db: sqlite3.Connection) -> None:
            for wire, salt, version in rows:
                row = db.execute(
                    "SELECT size FROM objects WHERE key = ? AND version = ?", (wire, version)
                ).fetchone()
                if row is not None:
                    self._drop(db, wire, salt, int(row[0]))

        await self._run(self._tx, change)

    async def remove(self, keys: Sequence[ObjectKey], *, pending_too: bool = False) -> None:
        if not keys:
            return
        query = (
            "SELECT size FROM objects WHERE key = ?"
            if pending_too
            else "SELECT size FROM objects WHERE key = ? AND (owner IS NULL OR owner = ?)"
        )
        wires = [(k.to_wire(), k.cache_salt) for k in keys]

        def change(db: sqlite3.Connection) -> None:
            for wire, salt in wires:
                # Never another process's pending entry: its write may land after ours
                # was deleted, and would then be stored but not accounted.
                args = (wire,) if pending_too else (wire, self._owner)
                row = db.execute(query, args).fetchone()
                if row is not None:
                    self._drop(db, wire, salt, int(row[0]))

        await self._run(self._tx, change)

    async def restore(self, victims: Sequence[Victim]) -> None:
        await self.record(victims)

    async def record(self, items: Sequence[tuple[ObjectKey, int]]) -> None:
        if not items:
            return
        rows = [(k.to_wire(), k.cache_salt, int(n)) for k, n in items]

        def change(db: sqlite3.Connection) -> None:
            first = self._tick(db, len(rows))
            for i, (wire, salt, size) in enumerate(rows):
                self._ensure_salt(db, salt)
                prev = db.execute("SELECT size FROM objects WHERE key = ?", (wire,)).fetchone()
                if prev is not None:
                    self._drop(db, wire, salt, int(prev[0]))
                db.execute(
                    "INSERT INTO objects VALUES (?, ?, ?, ?, 0, NULL, NULL)",
                    (wire, salt, size, first + i),
                )
                db.execute(
                    "UPDATE salts SET used = used + ?, objects = objects + 1 WHERE salt = ?",
                    (size, salt),
                )
                self._bump(db, "total_bytes", size)
                self._bump(db, "total_objects", 1)

        await self._run(self._tx, change)

    async def adopt(self, items: Sequence[tuple[ObjectKey, int]]) -> list[Victim]:
        if not items:
            return []
        rows = [(k.to_wire(), k.cache_salt, int(n)) for k, n in dict(items).items()]

        def change(db: sqlite3.Connection) -> list[Victim]:
            # One transaction: what another process admitted since the scan stays as it
            # is, and nothing is over quota at any commit.
            new = [
                r
                for r in rows
                if db.execute("SELECT 1 FROM objects WHERE key = ?", (r[0],)).fetchone() is None
            ]
            if not new:
                return []
            first = self._tick(db, len(new))
            low = db.execute("SELECT MIN(used_at) FROM objects").fetchone()[0]
            base = (first if low is None else int(low)) - len(new)  # below every entry
            for i, (wire, salt, size) in enumerate(new):
                self._ensure_salt(db, salt)
                db.execute(
                    "INSERT INTO objects VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                    (wire, salt, size, base + i, first + i),
                )
                db.execute(
                    "UPDATE salts SET used = used + ?, objects = objects + 1 WHERE salt = ?",
                    (size, salt),
                )
                self._bump(db, "total_bytes", size)
                self._bump(db, "total_objects", 1)
            victims: list[Victim] = []
            for salt in dict.fromkeys(salt for _, salt, _ in new):
                self._fit_salt(db, salt, victims)
            if self._capacity is not None:
                self._shrink_total(db, self._capacity if self._capacity else -1, 1 << 62, victims)
            return victims

        return await self._run(self._tx, change)

    async def enforce(self) -> list[Victim]:
        def change(db: sqlite3.Connection) -> list[Victim]:
            victims: list[Victim] = []
            for (salt,) in db.execute("SELECT salt FROM salts").fetchall():
                self._fit_salt(db, salt, victims)
            if self._capacity is not None:
                self._shrink_total(db, self._capacity if self._capacity else -1, 1 << 62, victims)
            return victims

        return await self._run(self._tx, change)

    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        if not keys:
            return []
        wires = [k.to_wire() for k in keys]

        def read() -> list[bool]:
            assert self._db is not None
            found: set[str] = set()
            for i in range(0, len(wires), 500):
                part = wires[i : i + 500]
                marks = ",".join("?" * len(part))
                found.update(
                    r[0]
                    for r in self._db.execute(
                        f"SELECT key FROM objects WHERE key IN ({marks})",
                        part,
                    )
                )
            return [w in found for w in wires]

        return await self._run(read)

    def touch(self, keys: Iterable[ObjectKey]) -> None:
        for key in keys:
            self._touched[key] = None

    async def _touch_loop(self) -> None:
        # Ends on close()'s flag too, not only on its cancellation (which a library
        # call in flush() might swallow).
        while not self._closed:
            await asyncio.sleep(self._touch_interval)
            try:
                await self.flush()
            except Exception:  # a touch is a hint: retried with the next batch
                pass

    async def flush(self) -> None:
        if not self._touched or self._exec is None:
            return
        keys, self._touched = list(self._touched), {}
        wires = [k.to_wire() for k in keys]

        def change(db: sqlite3.Connection) -> None:
            first = self._tick(db, len(wires))
            db.executemany(
                "UPDATE objects SET used_at = ? WHERE key = ?",
                [(first + i, w) for i, w in enumerate(wires)],
            )

        await self._run(self._tx, change)

    async def _pair(self, columns: str, salt: str) -> Tally:
        def read() -> Tally:
            assert self._db is not None
            row = self._db.execute(
                f"SELECT {columns} FROM salts WHERE salt = ?",
                (salt,),
            ).fetchone()
            return Tally(0, 0) if row is None else Tally(int(row[0]), int(row[1]))

        return await self._run(read)

    async def usage(self, salt: str) -> Tally:
        return await self._pair("used, objects", salt)

    async def evictions(self, salt: str) -> Tally:
        return await self._pair("evicted_bytes, evicted_objects", salt)

    async def lru_order(self, salt: str | None = None) -> list[Victim]:
        def read() -> list[Victim]:
            assert self._db is not None
            if salt is None:
                rows = self._db.execute("SELECT key, size FROM objects ORDER BY used_at")
            else:
                rows = self._db.execute(
                    "SELECT key, size FROM objects WHERE salt = ? ORDER BY used_at", (salt,)
                )
            return [(ObjectKey.from_wire(k), int(n)) for k, n in rows]

        return await self._run(read)

    async def committed_versions(self, keys: Sequence[ObjectKey]) -> dict[ObjectKey, int]:
        def read() -> dict[ObjectKey, int]:
            assert self._db is not None
            out: dict[ObjectKey, int] = {}
            for k in keys:
                row = self._db.execute(
                    "SELECT version FROM objects WHERE key = ? AND owner IS NULL", (k.to_wire(),)
                ).fetchone()
                if row is not None:
                    out[k] = int(row[0])
            return out

        return await self._run(read)

    async def lru_order_of(self, keys: Sequence[ObjectKey]) -> list[Victim]:
        wires = [k.to_wire() for k in keys]

        def read() -> list[Victim]:
            assert self._db is not None
            out: list[Victim] = []
            for w in wires:
                row = self._db.execute("SELECT size FROM objects WHERE key = ?", (w,)).fetchone()
                if row is not None:
                    out.append((ObjectKey.from_wire(w), int(row[0])))
            return out

        return await self._run(read)

    async def report(self) -> Snapshot:
        def read() -> Snapshot:
            db = self._db
            assert db is not None
            salts = []
            for salt, used, objects, eb, eo, rt, cfg in db.execute(
                "SELECT salt, used, objects, evicted_bytes, evicted_objects, runtime_quota, "
                "config_quota FROM salts WHERE objects > 0 OR runtime_quota IS NOT NULL "
                "OR config_quota IS NOT NULL ORDER BY salt"
            ):
                limit: int | None
                source: QuotaSource
                if rt is not None:
                    limit, source = int(rt), "runtime"
                elif cfg is not None:
                    limit, source = int(cfg), "config"
                else:
                    limit, source = self._default, "default"
                salts.append(
                    SaltReport(
                        salt, Tally(int(used), int(objects)), Tally(int(eb), int(eo)), limit, source
                    )
                )
            return Snapshot(
                salts=tuple(salts),
                total=Tally(self._meta(db, "total_bytes"), self._meta(db, "total_objects")),
                evicted=Tally(self._meta(db, "evicted_bytes"), self._meta(db, "evicted_objects")),
                default_quota=self._default,
                capacity=self._capacity,
            )

        snap = await self._run(read)
        self._snapshot = snap
        return snap

    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def is_empty(self) -> bool:
        def read() -> bool:
            assert self._db is not None
            return self._db.execute("SELECT 1 FROM objects LIMIT 1").fetchone() is None

        return await self._run(read)

    async def pending(self) -> list[tuple[ObjectKey, int, str, float, int]]:
        def read() -> list[tuple[ObjectKey, int, str, float, int]]:
            assert self._db is not None
            return [
                (ObjectKey.from_wire(k), int(n), str(o), float(at), int(ver))
                for k, n, o, at, ver in self._db.execute(
                    "SELECT key, size, owner, admitted_at, version FROM objects "
                    "WHERE owner IS NOT NULL"
                )
            ]

        return await self._run(read)
