"""The store's quota facade: UserLRU accounting + persisted quotas + evicting from backends.

:class:`QuotaManager` is what ``store.quota`` is and what the admin API calls. Quota
changes are persisted through a :class:`QuotaState` (a JSON file, or a Redis hash when the
first backend is Redis) and the objects they evict are deleted from every tier.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flexkv_store._aio import settle
from flexkv_store.errors import StorageError
from flexkv_store.keyformat import check_cache_salt
from flexkv_store.quota._accounting import Accounting, QuotaSource
from flexkv_store.quota._local import LocalAccounting
from flexkv_store.quota._userlru import Tally, Victim, load_quotas, save_quotas

__all__ = ["JsonQuotaState", "QuotaInfo", "QuotaManager", "QuotaState"]

log = logging.getLogger(__name__)
GIB = 1 << 30


class QuotaState(Protocol):
    """Where explicit quotas persist between runs."""

    async def load(self) -> dict[str, int]:
        """The saved quotas (salt -> bytes); empty when nothing was saved yet."""
        ...

    async def save(self, quotas: Mapping[str, int]) -> None:
        """Replace the saved quotas with ``quotas``."""
        ...

    def describe(self) -> str:
        """Where the state lives, for logs and ``/health``."""
        ...


class JsonQuotaState:
    """Quotas in a JSON file, replaced atomically on every change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def load(self) -> dict[str, int]:
        return await asyncio.to_thread(load_quotas, self.path)

    async def save(self, quotas: Mapping[str, int]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(save_quotas, self.path, dict(quotas))
        except OSError as exc:
            raise StorageError(
                f"quota applied but not saved to {self.path}: {exc.strerror or exc}"
            ) from exc

    def describe(self) -> str:
        return f"json:{self.path}"


@dataclass(frozen=True, slots=True)
class QuotaInfo:
    """One salt's quota and usage, as the admin API reports it."""

    cache_salt: str
    limit_bytes: int | None
    current_usage_bytes: int
    objects: int
    exists: bool
    #: Where the limit comes from: ``runtime`` (set through the API), ``config``, ``default``.
    source: QuotaSource = "default"

    @property
    def limit_gb(self) -> float | None:
        return None if self.limit_bytes is None else self.limit_bytes / GIB

    @property
    def current_usage_gb(self) -> float:
        return self.current_usage_bytes / GIB

    def as_dict(self) -> dict[str, Any]:
        """The admin API's JSON shape (``_default`` names the empty salt)."""
        return {
            "cache_salt": self.cache_salt or "_default",
            "limit_gb": self.limit_gb,
            "limit_bytes": self.limit_bytes,
            "current_usage_gb": self.current_usage_gb,
            "current_usage_bytes": self.current_usage_bytes,
            "objects": self.objects,
            "exists": self.exists,
            "source": self.source,
        }


def api_salt(salt: str) -> str:
    """Map the admin API's ``_default`` to the empty salt and validate the rest."""
    return "" if salt == "_default" else check_cache_salt(salt)


class QuotaManager:
    """Quota operations of a store: validated, persisted, with evictions carried out.

    ``evict`` deletes victims from every tier; ``lock`` is the store's write lock, held
    while accounting changes and victims are deleted so that no put of the same salt
    interleaves. With the local accounting, run-time quotas persist through ``state``; a
    shared accounting keeps them itself (every process sees a change at once).
    """

    def __init__(
        self,
        accounting: Accounting,
        *,
        evict: Callable[[list[Victim]], Awaitable[Sequence[BaseException]]],
        lock: Callable[[], Any],
        state: QuotaState | None = None,
    ) -> None:
        self.accounting = accounting
        self.state = state if isinstance(accounting, LocalAccounting) else None
        self._evict = evict
        self._lock = lock

    async def load(self, initial: Mapping[str, int]) -> list[Victim]:
        """Apply the config's quotas; the run-time ones (persisted) override them."""
        victims = await self.accounting.apply_config(initial)
        acct = self.accounting
        if isinstance(acct, LocalAccounting) and self.state is not None:
            victims += acct.load_runtime(await self.state.load())
        return victims

    async def _persist(self) -> None:
        acct = self.accounting
        if self.state is not None and isinstance(acct, LocalAccounting):
            await self.state.save(acct.runtime_quotas())

    async def _carry_out(self, victims: list[Victim]) -> Tally:
        """Delete the victims a change chose; what was evicted.

        Shielded from cancellation (they already left the accounting, so a half-done
        eviction would leave objects nobody counts). Victims a backend could not delete stay
        stored and counted: then a ``StorageError`` says so (the change itself applies).
        """
        errors = await settle(self._evict(victims))
        still = await self.accounting.contains([k for k, _ in victims]) if victims else []
        done = [v for v, kept in zip(victims, still, strict=True) if not kept]
        if errors:
            raise StorageError(
                f"the change applies, but {len(victims) - len(done)} object(s) could not be "
                "evicted: they stay stored and counted, and their deletes are retried"
            ) from errors[0]
        return Tally(sum(n for _, n in done), len(done))

    async def set_quota(self, salt: str, limit_bytes: int) -> Tally:
        """Set ``salt``'s run-time quota; returns what it evicted (bytes, objects)."""
        salt = api_salt(salt)

        async def change() -> Tally:
            victims = await self.accounting.set_quota(salt, limit_bytes)
            try:
                await self._persist()
            finally:
                tally = await self._carry_out(victims)  # they already left the accounting
            return tally

        async with self._lock():
            # Whole under settle: a cancelled caller must not leave victims that left the
            # accounting (a shared one commits in its own thread/server) undeleted.
            return await settle(change())

    def get_quota(self, salt: str) -> int | None:
        """``salt``'s own quota in bytes (run-time or config), or ``None``."""
        report = self.accounting.peek(api_salt(salt))
        return None if report is None or report.source == "default" else report.limit

    async def delete_quota(self, salt: str) -> bool:
        """Remove ``salt``'s run-time quota (it falls back to its config quota, else the
        default); whether one was set."""
        salt = api_salt(salt)

        async def change() -> bool:
            existed, victims = await self.accounting.delete_quota(salt)
            try:
                if existed:
                    await self._persist()
            finally:
                await self._carry_out(victims)
            return existed

        async with self._lock():
            return await settle(change())

    async def set_default_quota(self, limit_bytes: int | None) -> Tally:
        """Change the default quota (None = unlimited, 0 = allowlist); evicts at once."""

        async def change() -> Tally:
            return await self._carry_out(await self.accounting.set_default_quota(limit_bytes))

        async with self._lock():
            return await settle(change())

    async def set_capacity(self, limit_bytes: int | None) -> Tally:
        """Change the global capacity; evicts in global LRU order at once."""

        async def change() -> Tally:
            return await self._carry_out(await self.accounting.set_capacity(limit_bytes))

        async with self._lock():
            return await settle(change())

    def info(self, salt: str) -> QuotaInfo:
        """Quota and usage of one salt (a shared accounting: as of the last refresh)."""
        salt = api_salt(salt)
        report = self.accounting.peek(salt)
        if report is None:
            return QuotaInfo(salt, self.accounting.default_quota, 0, 0, False, "default")
        return QuotaInfo(
            salt,
            report.limit,
            report.used.nbytes,
            report.used.objects,
            report.source != "default",
            report.source,
        )

    def usage(self, salt: str | None = None) -> dict[str, QuotaInfo]:
        """Quota and usage of one salt, or of every salt with a quota or usage > 0."""
        if salt is not None:
            info = self.info(salt)
            return {info.cache_salt: info}
        out: dict[str, QuotaInfo] = {}
        snap = self.accounting.snapshot()
        for report in snap.salts if snap is not None else ():
            info = self.info(report.salt if report.salt else "_default")
            if info.exists or info.objects or info.current_usage_bytes:
                out[report.salt] = info
        return out
