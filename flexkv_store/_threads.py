"""The store's worker threads, at a lower CPU priority than the engine's own threads.

Copies, checksums and I/O submission run in worker threads so that the event loop never
waits on them. On a machine whose cores they keep busy, the loop thread still has to wait
for a core whenever it wakes (measured: 5-9 ms late on 2 cores during ``put_blocks``,
although it did no work itself). Worker threads therefore run ``BACKGROUND_NICE`` steps
nicer than the thread that started them: the kernel then hands a waking loop thread
a core at once, and the workers still get every cycle the engine leaves idle. (Each worker
lowers its own priority when it starts, relative to the thread that started it; threads a
worker starts, such as the copy routine's OpenMP team, inherit the lower priority.)
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["BACKGROUND_NICE", "lower_priority", "off_loop", "shared_pool", "worker_pool"]

_T = TypeVar("_T")

#: How many nice steps below their creator worker threads run (Linux; 0 turns it off).
BACKGROUND_NICE = 10


def lower_priority(steps: int | None = None) -> None:
    """Make the calling thread ``steps`` (default ``BACKGROUND_NICE``) nicer, at most 19.

    Linux keeps a nice value per thread; elsewhere, or where it fails, nothing changes.
    Raising one's own nice value never needs privileges.
    """
    steps = BACKGROUND_NICE if steps is None else steps
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + steps))
    except OSError:
        pass


def worker_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at :func:`lower_priority`."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=lower_priority)


_shared: dict[str, ThreadPoolExecutor] = {}
_shared_lock = threading.Lock()


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool called ``name`` (a :func:`worker_pool`), made on first use."""
    with _shared_lock:
        pool = _shared.get(name)
        if pool is None:
            pool = _shared[name] = worker_pool(workers, name)
        return pool


def _reset_after_fork() -> None:
    # A forked child has none of the parent's worker threads (nor a lock they held): its
    # first use of a shared pool starts new ones.
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def off_loop(fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    """Run ``fn(*args)`` (a large copy) in the process's shared copy threads.

    For copies that must not run on the event loop but belong to no adapter's own pool
    (the memory adapter's, the store's L1 tier's). Wrap the future in ``settle`` when the
    copy reads or writes a caller's buffer.
    """
    pool = shared_pool("flexkv-copies", 2)
    return asyncio.get_running_loop().run_in_executor(pool, fn, *args)
