"""``quota.accounting: local``: the in-memory UserLRU of one process."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

from flexkv_store.errors import QuotaExceededError
from flexkv_store.keyformat import ObjectKey, check_cache_salt
from flexkv_store.quota._accounting import Accounting, Admitted, QuotaSource, SaltReport, Snapshot
from flexkv_store.quota._userlru import Admission, Tally, UserLRU, Victim

__all__ = ["LocalAccounting", "SupersededError", "superseded_error"]


class SupersededError(QuotaExceededError):
    """An item of a ``put_each`` batch that a later item of the same batch evicted (the
    batch exceeds the quota): nothing of it is stored, as if it had been written and then
    evicted."""


def superseded_error(key: ObjectKey, size: int, limit: int | None) -> SupersededError:
    """The outcome of an item a later item of its own batch evicted."""
    return SupersededError(
        key.cache_salt,
        size,
        limit if limit is not None else 0,
        detail="evicted by later items of the same batch (the batch exceeds the quota)",
    )


class LocalAccounting(Accounting):
    """One process's accounting: a :class:`UserLRU`, no I/O, rebuilt from ``scan``.

    Admissions are final at once (no other process can be writing a victim), so ``commit``
    is a no-op and nothing is ever pending.
    """

    kind: ClassVar[str] = "local"
    shared: ClassVar[bool] = False

    def __init__(self, lru: UserLRU | None = None) -> None:
        self.lru = lru if lru is not None else UserLRU()
        self._config: dict[str, int] = {}
        self._runtime: dict[str, int] = {}

    # -- limits ------------------------------------------------------------------------

    @property
    def default_quota(self) -> int | None:
        return self.lru.default_quota

    @property
    def capacity(self) -> int | None:
        return self.lru.capacity

    async def set_default_quota(self, limit: int | None) -> list[Victim]:
        return self.lru.set_default_quota(limit)

    async def set_capacity(self, limit: int | None) -> list[Victim]:
        return self.lru.set_capacity(limit)

    def _source(self, salt: str) -> QuotaSource:
        if salt in self._runtime:
            return "runtime"
        if salt in self._config:
            return "config"
        return "default"

    async def quota(self, salt: str) -> tuple[int | None, QuotaSource]:
        return self.lru.quota(salt), self._source(salt)

    def quick_limits(self, salt: str) -> tuple[int | None, int | None]:
        """(quota, capacity) without I/O, for refusing before waiting for a lock."""
        return self.lru.quota(salt), self.lru.capacity

    async def quotas(self) -> dict[str, tuple[int, QuotaSource]]:
        return {s: (n, self._source(s)) for s, n in self.lru.quotas().items()}

    def runtime_quotas(self) -> dict[str, int]:
        """The quotas set at run time (what persists)."""
        return dict(self._runtime)

    async def set_quota(self, salt: str, limit: int) -> list[Victim]:
        victims = self.lru.set_quota(salt, limit)
        self._runtime[check_cache_salt(salt)] = limit
        return victims

    async def delete_quota(self, salt: str) -> tuple[bool, list[Victim]]:
        salt = check_cache_salt(salt)
        if salt not in self._runtime:
            return False, []
        del self._runtime[salt]
        if salt in self._config:
            return True, self.lru.set_quota(salt, self._config[salt])
        _, victims = self.lru.delete_quota(salt)
        return True, victims

    async def apply_config(self, quotas: Mapping[str, int]) -> list[Victim]:
        merged = {**quotas, **self._runtime}
        victims = self.lru.replace_quotas(merged)  # validates everything first
        self._config = {check_cache_salt(s): int(n) for s, n in quotas.items()}
        return victims

    def load_runtime(self, quotas: Mapping[str, int]) -> list[Victim]:
        """Quotas persisted by an earlier run (run-time ones)."""
        merged = {**self._config, **quotas}
        victims = self.lru.replace_quotas(merged)
        self._runtime = {check_cache_salt(s): int(n) for s, n in quotas.items()}
        return victims

    # -- objects -----------------------------------------------------------------------

    async def admit(self, items: Sequence[tuple[ObjectKey, int]], *, each: bool) -> Admitted:
        lru = self.lru
        batch: dict[ObjectKey, int] = {}
        for key, size in items:
            batch[key] = size
        out = Admitted()
        if not each:
            for key, size in batch.items():
                self._refuse_alone(key, size)
        admitted: dict[ObjectKey, Admission] = {}
        superseded: dict[ObjectKey, Admission] = {}
        try:
            for key, size in batch.items():
                try:
                    adm = lru.admit(key, size)
                except QuotaExceededError as exc:
                    if not each:
                        raise
                    out.refused[key] = exc
                    continue
                for victim in adm.victims:
                    popped = admitted.pop(victim[0], None)
                    if popped is not None:
                        superseded[victim[0]] = popped
                        if popped.previous_size is not None:  # stored: the value replaced
                            victim = (victim[0], popped.previous_size)
                    out.victims.append(victim)
                admitted[key] = adm
        except BaseException:
            undone: list[Victim] = []
            for adm in reversed(list(admitted.values())):
                undone += lru.rollback(adm)
            out.victims += undone
            raise
        out.admissions = list(admitted.values())
        out.never_stored = {k for k, a in superseded.items() if a.previous_size is None}
        if each:
            for key in superseded:
                out.refused[key] = superseded_error(key, batch[key], lru.quota(key.cache_salt))
        return out

    def _refuse_alone(self, key: ObjectKey, size: int) -> None:
        for bound in (self.lru.quota(key.cache_salt), self.lru.capacity):
            if bound is not None and (size > bound or bound == 0):
                raise QuotaExceededError(key.cache_salt, size, bound)

    async def commit(self, admissions: Sequence[Admission]) -> None:
        return None

    async def rollback(self, admissions: Sequence[Admission]) -> list[Victim]:
        victims: list[Victim] = []
        for adm in reversed(admissions):
            victims += self.lru.rollback(adm)
        return victims

    async def abandon(self, admissions: Sequence[Admission]) -> None:
        for adm in admissions:
            if self.lru._global.get(adm.key) == adm._version:
                self.lru.remove(adm.key)

    async def committed_versions(self, keys: Sequence[ObjectKey]) -> dict[ObjectKey, int]:
        order = self.lru._global
        return {k: order[k] for k in keys if k in order}

    async def remove(self, keys: Sequence[ObjectKey], *, pending_too: bool = False) -> None:
        for key in keys:
            self.lru.remove(key)

    async def restore(self, victims: Sequence[Victim]) -> None:
        for key, size in victims:
            self.lru.record(key, size)

    async def record(self, items: Sequence[tuple[ObjectKey, int]]) -> None:
        for key, size in items:
            self.lru.record(key, size)

    async def enforce(self) -> list[Victim]:
        return self.lru.enforce()

    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        return [self.lru.contains(k) for k in keys]

    def known(self, key: ObjectKey) -> bool | None:
        return self.lru.contains(key)

    def touch(self, keys: Iterable[ObjectKey]) -> None:
        for key in keys:
            self.lru.touch(key)

    async def usage(self, salt: str) -> Tally:
        return self.lru.usage(salt)

    async def evictions(self, salt: str) -> Tally:
        return self.lru.evictions(salt)

    async def lru_order(self, salt: str | None = None) -> list[Victim]:
        return list(self.lru.iter_lru(salt))

    async def report(self) -> Snapshot:
        return self._snapshot()

    def snapshot(self) -> Snapshot:
        return self._snapshot()

    def peek(self, salt: str) -> SaltReport | None:
        lru = self.lru
        if salt not in lru._salts:
            return None
        return SaltReport(
            salt, lru.usage(salt), lru.evictions(salt), lru.quota(salt), self._source(salt)
        )

    def _snapshot(self) -> Snapshot:
        lru = self.lru
        return Snapshot(
            salts=tuple(
                SaltReport(s, lru.usage(s), lru.evictions(s), lru.quota(s), self._source(s))
                for s in lru.salts()
            ),
            total=Tally(lru.total_bytes, lru.total_objects),
            evicted=lru.eviction_totals,
            default_quota=lru.default_quota,
            capacity=lru.capacity,
        )

    async def is_empty(self) -> bool:
        return len(self.lru) == 0

    async def pending(self) -> list[tuple[ObjectKey, int, str, float, int]]:
        return []
