"""Freed buffers kept for reuse by size, bounded in bytes.

Fresh memory costs page faults that can exceed the copy it serves several times over, so
the fs adapter's aligned scratch buffers and the memory adapter's large payloads are
kept when freed and handed out again for the same size. Over the bound, the size class
freed least recently gives way first: a workload that moves on to larger objects keeps
the buffers it now uses warm.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

__all__ = ["FreeLists"]

_T = TypeVar("_T")


class FreeLists(Generic[_T]):
    """Thread-safe free lists by size, holding at most ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        # Per size, its free items; sizes in the order they were last given back to.
        self._lists: dict[int, deque[_T]] = {}
        self._bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes of the items held."""
        return self._bytes

    def count(self, size: int) -> int:
        """Items of ``size`` held."""
        with self._lock:
            return len(self._lists.get(size, ()))

    def take(self, size: int) -> _T | None:
        """The item of ``size`` given back most recently (likeliest still in cache)."""
        with self._lock:
            free = self._lists.get(size)
            if not free:
                return None
            self._bytes -= size
            item = free.pop()
            if not free:
                del self._lists[size]
            return item

    def give(self, size: int, item: _T) -> None:
        """Keep ``item`` (of ``size`` bytes) for reuse, dropping others to stay in bounds;
        an item larger than the whole bound is dropped itself."""
        if size > self.limit:
            return
        dropped: list[_T] = []  # their memory is freed after the lock is released
        with self._lock:
            while self._bytes + size > self.limit:
                old, free = next(iter(self._lists.items()))
                dropped.append(free.popleft())
                self._bytes -= old
                if not free:
                    del self._lists[old]
            free = self._lists.pop(size) if size in self._lists else deque()
            free.append(item)
            self._lists[size] = free  # now the most recently given back
            self._bytes += size
