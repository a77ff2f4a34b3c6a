"""The store's worker threads, at a lower CPU priority than the engine's own threads.

Copies, checksums and I/O submission run in worker threads so that the event loop never
waits on them. On a machine whose cores they keep busy, the loop thread still has to wait
for a core whenever it wakes (measured: 5-9 ms late on 2 cores during ``put_blocks``,
although it did no work itself). Worker threads therefore run ``BACKGROUND_NICE`` steps
nicer than the thread that started them, so they get less of a busy core than the engine's
threads and still every cycle the engine leaves idle.

A lower weight alone does not hand a waking loop thread a core at once: the kernel's EEVDF
scheduler lets the running task finish a protected slice first, and checks again only at
the next tick (4 ms at HZ=250). Since Linux 6.12 a waking task with a shorter slice than the
running one preempts it at once, so workers also ask for a longer slice,
``BACKGROUND_SLICE_NS`` (``sched_setattr``'s ``sched_runtime``; the default is about 0.7-3 ms
by core count). Older kernels ignore it. Measured with ``bench/store_blocks.py`` on 2 cores
(memory backend): the loop's median stall during ``put_blocks``/``get_blocks`` went from
2.5-3.7 ms to 1.1-1.9 ms over several runs (1.24 ms in a full run with 4 ms slices).

Each worker lowers its own priority when it starts, relative to the thread that started it;
threads a worker starts, such as the copy routine's OpenMP team, inherit both settings.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import platform
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = [
    "BACKGROUND_NICE",
    "BACKGROUND_SLICE_NS",
    "lower_priority",
    "off_loop",
    "shared_pool",
    "worker_pool",
]

_T = TypeVar("_T")

#: How many nice steps below their creator worker threads run (Linux; 0 turns it off).
BACKGROUND_NICE = 10


#: The time slice worker threads ask for (Linux 6.12+ clamps it to 0.1-100 ms): longer than
#: any default (at most 3 ms, on 8 or more cores), so a waking engine thread preempts a
#: worker at once, and short enough that a runnable engine thread that is not waking up
#: waits little more than it did for a default slice.
BACKGROUND_SLICE_NS = 4_000_000

# sched_setattr(2) by number, for 64-bit userlands only: platform.machine() names the
# kernel's architecture, and a 32-bit userland on it numbers its syscalls differently.
_SCHED_SETATTR = (
    {"x86_64": 314, "aarch64": 274}.get(platform.machine())
    if ctypes.sizeof(ctypes.c_void_p) == 8
    else None
)
_SCHED_FLAG_KEEP_POLICY = 0x08


class _SchedAttr(ctypes.Structure):
    # struct sched_attr, version 0 (48 bytes), from include/uapi/linux/sched/types.h.
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


def _syscall() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_uint]
    fn.restype = ctypes.c_long
    return fn


_sys_call: Any = _syscall() if _SCHED_SETATTR is not None else None


def _ask_slice(tid: int, nice: int, slice_ns: int) -> bool:
    """Ask for a ``slice_ns`` time slice for thread ``tid`` (its policy kept, its nice value
    ``nice``); ``False`` where the call is missing or refused (an RT thread, a kernel
    before 5.3)."""
    if _sys_call is None:
        return False
    attr = _SchedAttr(
        size=ctypes.sizeof(_SchedAttr),
        sched_flags=_SCHED_FLAG_KEEP_POLICY,
        sched_nice=nice,
        sched_runtime=slice_ns,
    )
    try:
        return int(_sys_call(_SCHED_SETATTR, tid, ctypes.byref(attr), 0)) == 0
    except Exception:  # never break the pool whose initializer this runs in
        return False


def lower_priority(steps: int | None = None) -> None:
    """Make the calling thread ``steps`` (default ``BACKGROUND_NICE``) nicer, at most 19,
    and ask for a ``BACKGROUND_SLICE_NS`` time slice.

    Linux keeps both per thread; elsewhere, or where it fails, nothing changes. Raising
    one's own nice value or slice never needs privileges.
    """
    steps = BACKGROUND_NICE if steps is None else steps
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        return
    _ask_slice(tid, nice, BACKGROUND_SLICE_NS)


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
