"""Large copies into and out of ``bytes`` that do not hold the GIL.

``bytes(view)`` copies holding the GIL, and it also faults the fresh pages in while
holding it (on a VM ~20 ms per 32 MiB, ten times the copy itself), so one such copy in a
worker thread stalls the event loop and every other worker for its whole length.
:func:`bytes_of` instead allocates the object uninitialised
(``PyBytes_FromStringAndSize(NULL, n)``: no memset under the GIL) and fills it with
``memmove`` through ctypes, which releases the GIL: the page faults happen then too.
Nothing else can see the new object before it is filled.

Transparent huge pages would make those faults 512 times fewer, but with THP ``defrag``
set to ``madvise`` (the common default) an advised fault compacts memory synchronously,
which measured slower, not faster, whenever free memory was fragmented (after another
process had run); so these short-lived objects are not advised. Long-lived buffers are, with
:func:`advise_huge`: ``mmap.madvise`` holds the GIL, and ``madvise`` waits for the
process's memory-map lock, which other threads' page faults and ``munmap`` calls hold (a
trace showed the loop and every worker waiting 4 ms on the GIL behind one such call).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from typing import Any

import numpy as np

__all__ = ["address_of", "advise_huge", "bytes_of", "copy_into", "map_anonymous"]

#: Below this, ``bytes(view)`` (GIL held for microseconds) beats a ctypes round trip.
_SMALL = 64 << 10
# The C API's way to make a bytes object that the caller fills before sharing it.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytes.restype = ctypes.py_object


def address_of(buf: Any) -> int:
    """The address of a buffer's first byte."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def bytes_of(view: memoryview) -> bytes:
    """A new ``bytes`` holding ``view`` (C-contiguous), copied without the GIL."""
    n = view.nbytes
    if n < _SMALL:
        return bytes(view)
    out: bytes = _new_bytes(None, n)
    dst = ctypes.cast(ctypes.c_char_p(out), ctypes.c_void_p).value or 0
    ctypes.memmove(dst, address_of(view), n)
    return out


def copy_into(dst: memoryview, src: Any) -> None:
    """``dst[:len(src)] = src`` without the GIL (both C-contiguous, ``dst`` writable);
    copies under 64 KiB take the GIL for the microseconds they last."""
    source = memoryview(src)
    n = source.nbytes
    if dst.readonly or n > dst.nbytes:
        raise ValueError(
            f"dst: needs {n} writable bytes, has {dst.nbytes}"
            + (" (read-only)" if dst.readonly else "")
        )
    if n >= _SMALL:
        ctypes.memmove(address_of(dst), address_of(src), n)
    elif n:
        dst.cast("B")[:n] = source.cast("B")


_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_madvise: Any = None
if _MADV_HUGEPAGE is not None and sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


def advise_huge(buf: Any) -> bool:
    """Ask for transparent huge pages over ``buf`` (page-aligned, e.g. an anonymous
    ``mmap``), without the GIL; ``False`` where that is not possible."""
    if _madvise is None:
        return False
    n = memoryview(buf).nbytes
    return bool(n) and _madvise(address_of(buf), n, _MADV_HUGEPAGE) == 0


# Anonymous mappings made and unmade without the GIL. ``mmap.mmap()`` holds the GIL in
# mmap(2), which waits for the memory-map lock while other threads fault pages in or pin
# them for O_DIRECT (a trace showed fs workers holding the GIL 10-20 ms that way, with the
# event loop waiting on it). libc's mmap/munmap through ctypes release it.
_libc_mmap: Any = None
_libc_munmap: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc_mmap, _libc_munmap = _libc.mmap, _libc.munmap
        _libc_mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc_mmap.restype = ctypes.c_void_p
        _libc_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc_munmap.restype = ctypes.c_int
    except (OSError, AttributeError):
        _libc_mmap = _libc_munmap = None
_MAP_FAILED = ctypes.c_void_p(-1).value


def _unmap(
    self: Any,
    _munmap: Any = _libc_munmap,
    _addressof: Any = ctypes.addressof,
    _sizeof: Any = ctypes.sizeof,
) -> None:
    # Bound at definition: this may run while the interpreter shuts down.
    _munmap(_addressof(self), _sizeof(self))


@functools.lru_cache(maxsize=256)
def _mapping_type(size: int) -> Any:
    # A byte array over a mapping it owns: unmapped when the array goes, which is when the
    # last memoryview of it goes (each keeps the array alive).
    return type("_Mapping", (ctypes.c_ubyte * size,), {"__del__": _unmap})


def map_anonymous(size: int, *, huge: bool = False) -> memoryview:
    """A writable, page-aligned private anonymous mapping of ``size`` bytes (format ``B``),
    made without the GIL where libc allows and unmapped once its last view is gone;
    ``huge`` asks for transparent huge pages.

    (Faulting the pages in at once, ``MADV_POPULATE_WRITE``, measured worse: it holds the
    memory-map lock for the whole mapping, which made other threads' GIL-holding
    allocations wait longer.)
    """
    if size <= 0:
        raise ValueError(f"size: must be positive, got {size}")
    if _libc_mmap is None:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge:
            advise_huge(mm)
        return memoryview(mm)
    array_type = _mapping_type(size)  # first: nothing to unmap if it fails
    addr = _libc_mmap(
        None,
        size,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        -1,
        0,
    )
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes failed")
    view = memoryview(array_type.from_address(addr)).cast("B")
    if huge and _madvise is not None:
        _madvise(addr, size, _MADV_HUGEPAGE)
    return view
