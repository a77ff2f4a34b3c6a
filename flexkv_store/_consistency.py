"""The Store's concurrency bookkeeping: write locks, change stamps, suspect copies.

Three small structures that keep the Store's promise under races and partial failures
(DESIGN section 5, "Invariants under failure"):

- :class:`WriteLocks`: one lock per salt while someone holds or waits for it (dropped when
  idle), under a store-wide gate that quota and capacity changes take exclusively, without
  visiting every salt.
- :class:`Generations`: a change stamp per key, kept only while a read that could be
  affected is in flight, so that a read never promotes (copies back into L1 or an earlier
  backend) a value that a write or delete replaced while it was reading.
- :class:`Suspects`: the backends that failed a write or delete of a key, and so may hold
  a stale or unwanted copy; reads skip them for that key until a later write, delete or
  :meth:`Store.repair` succeeds there.

All three belong to the store's event loop and are used without locks of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable

from flexkv_store.keyformat import ObjectKey

__all__ = ["Generations", "Suspects", "WriteLocks"]


class WriteLocks:
    """Per-salt write locks under a shared/exclusive gate.

    ``salts(...)`` holds the gate shared and the named salts' locks (taken in sorted order,
    so two batches never deadlock); ``exclusive()`` waits until no salt lock is held and
    keeps new writers out meanwhile (writers waiting for it do not starve it).
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        """How many salt locks exist now (held or waited for)."""
        return len(self._locks)

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    @contextlib.asynccontextmanager
    async def salts(self, salts: Iterable[str]) -> AsyncIterator[None]:
        while self._exclusive or self._exclusive_waiting:
            await self._wait()
        self._shared += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                for salt in sorted(set(salts)):
                    await stack.enter_async_context(self._salt(salt))
                yield
        finally:
            self._shared -= 1
            self._wake()

    @contextlib.asynccontextmanager
    async def _salt(self, salt: str) -> AsyncIterator[None]:
        entry = self._locks.get(salt)
        if entry is None:
            entry = self._locks[salt] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[salt]

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._exclusive_waiting += 1
        try:
            while self._exclusive or self._shared:
                await self._wait()
        except BaseException:
            self._exclusive_waiting -= 1
            self._wake()
            raise
        self._exclusive_waiting -= 1
        self._exclusive = True
        try:
            yield
        finally:
            self._exclusive = False
            self._wake()


class Generations:
    """Change stamps of keys, for reads that must not promote a replaced value.

    A read calls :meth:`begin` (a stamp) and :meth:`end`; every put (when it starts and
    when it ends), delete and eviction calls :meth:`changed`. :meth:`unchanged` tells a
    read whether its key changed after it began. Stamps are kept only while reads are in
    flight, and pruned to those newer than the oldest of them.
    """

    _PRUNE_AT = 4096

    def __init__(self) -> None:
        self.clock = 0
        self._changed: dict[ObjectKey, int] = {}
        self._readers: Counter[int] = Counter()

    def begin(self) -> int:
        stamp = self.clock
        self._readers[stamp] += 1
        return stamp

    def hold(self, stamp: int) -> None:
        """Keep ``stamp``'s read alive for one more :meth:`end` (work it left running)."""
        self._readers[stamp] += 1

    def end(self, stamp: int) -> None:
        left = self._readers[stamp] - 1
        if left:
            self._readers[stamp] = left
        else:
            del self._readers[stamp]
        if not self._readers:
            self._changed.clear()
        elif len(self._changed) > self._PRUNE_AT:
            oldest = min(self._readers)
            self._changed = {k: v for k, v in self._changed.items() if v > oldest}

    def changed(self, keys: Iterable[ObjectKey]) -> None:
        self.clock += 1
        if self._readers:  # no read in flight: nothing a stamp could protect
            stamp = self.clock
            for key in keys:
                self._changed[key] = stamp

    def unchanged(self, key: ObjectKey, since: int) -> bool:
        return self._changed.get(key, 0) <= since


class Suspects:
    """Backends (by index) that may hold a stale copy of a key, and keys held only there.

    ``orphans`` are keys that no backend holds as a good copy (their last write failed
    everywhere, or a delete failed somewhere): the accounting keeps them while any copy may
    exist and forgets them once every suspect copy is gone.
    """

    def __init__(self) -> None:
        self._by_key: dict[ObjectKey, set[int]] = {}
        self.orphans: set[ObjectKey] = set()

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def add(self, backend: int, key: ObjectKey) -> None:
        self._by_key.setdefault(key, set()).add(backend)

    def at(self, backend: int, key: ObjectKey) -> bool:
        found = self._by_key.get(key)
        return found is not None and backend in found

    def good_copy(self, backend: int, key: ObjectKey) -> None:
        """``backend`` now holds a good copy of ``key`` (a write succeeded there)."""
        self._discard(backend, key)
        self.orphans.discard(key)

    def removed(self, backend: int, key: ObjectKey) -> bool:
        """``backend`` holds no copy of ``key`` any more (a delete succeeded there).

        True when that was an orphan's last suspect copy: the key is gone everywhere.
        """
        self._discard(backend, key)
        if key in self.orphans and key not in self._by_key:
            self.orphans.discard(key)
            return True
        return False

    def _discard(self, backend: int, key: ObjectKey) -> None:
        found = self._by_key.get(key)
        if found is not None:
            found.discard(backend)
            if not found:
                del self._by_key[key]

    def keys_at(self, backend: int) -> list[ObjectKey]:
        return [k for k, bs in self._by_key.items() if backend in bs]
