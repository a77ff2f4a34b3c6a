"""Build and load the cffi io_uring wrappers (``csrc/uring_engine.c``) at run time.

Installing flexkv-store never compiles anything: the fs adapter calls :func:`load` when it
opens with ``io_engine`` ``auto`` or ``io_uring``. The first call in a process compiles the
wrappers with cffi in API mode (gcc, the Python headers and liburing-dev are needed, ~1 s)
through :mod:`flexkv_store._cbuild` into a cache directory keyed by a hash of the sources and
the cffi version, so later processes just import the shared object. Every failure (no
compiler, no liburing, no source tree, a kernel without io_uring) becomes
:class:`UringUnavailable` with the reason; the adapter then falls back to the threads engine
and logs that reason once.

Cache directory: ``$FLEXKV_STORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/flexkv_store``, else
``~/.cache/flexkv_store``.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from flexkv_store import _cbuild
from flexkv_store._cbuild import CModule as UringLib
from flexkv_store._paths import csrc_dir

__all__ = ["UringLib", "UringUnavailable", "cache_dir", "load", "source_dir"]

_MODULE_PREFIX = "_flexkv_uring_"
#: cffi needs ``struct iovec`` spelled out; ``...`` lets the compiler supply its real layout.
_CDEF_PRELUDE = "struct iovec { void *iov_base; size_t iov_len; ...; };\n"


class UringUnavailable(RuntimeError):
    """The io_uring engine cannot be used here; ``str(exc)`` says why."""


_lock = threading.Lock()
_loaded: UringLib | UringUnavailable | None = None


def source_dir() -> Path:
    """Where ``uring_engine.c`` and ``uring_engine.h`` live (see :func:`csrc_dir`)."""
    return csrc_dir()


def cache_dir() -> Path:
    """Directory holding compiled engines, one file per source hash."""
    return _cbuild.cache_dir()


def _sources() -> tuple[str, str]:
    try:
        c_text, h_text = _cbuild.read_sources("uring_engine.c", "uring_engine.h")
    except _cbuild.CBuildError as exc:
        raise UringUnavailable(str(exc)) from None
    return c_text, h_text


def _build(module_name: str, c_text: str, h_text: str, target_dir: Path) -> Path:
    """Compile the wrappers into ``target_dir`` and return the shared object's path."""
    hint = "" if Path("/usr/include/liburing.h").exists() else " (is liburing-dev installed?)"
    try:
        return _cbuild.compile_module(
            module_name,
            c_text,
            _cbuild.cdef_from_header(h_text, _CDEF_PRELUDE),
            target_dir,
            what="the io_uring wrappers",
            libraries=["uring"],
            hint=hint,
        )
    except _cbuild.CBuildError as exc:
        raise UringUnavailable(str(exc)) from None


def _load_uncached() -> UringLib:
    if not sys.platform.startswith("linux"):
        raise UringUnavailable(f"io_uring needs Linux (this is {sys.platform})")
    c_text, h_text = _sources()
    try:
        name = _cbuild.module_name(_MODULE_PREFIX, c_text, h_text, _CDEF_PRELUDE)
        lib = _cbuild.load_module(name, lambda target: _build(name, c_text, h_text, target))
    except _cbuild.CBuildError as exc:
        raise UringUnavailable(str(exc)) from None
    # A kernel without io_uring (or a seccomp filter that blocks it) shows up only here.
    err = lib.ffi.new("int *")
    ring = lib.lib.fkv_ring_open(4, err)
    if ring == lib.ffi.NULL:
        raise UringUnavailable(f"io_uring_queue_init failed: {os.strerror(err[0])}")
    lib.lib.fkv_ring_close(ring)
    return lib


def load() -> UringLib:
    """The compiled wrappers, building them on first use; raises :class:`UringUnavailable`.

    The outcome (success or the reason for failure) is remembered for the process.
    """
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                _loaded = _load_uncached()
            except UringUnavailable as exc:
                _loaded = exc
            except OSError as exc:  # unwritable cache directory and the like
                _loaded = UringUnavailable(f"cannot build the io_uring wrappers: {exc}")
        if isinstance(_loaded, UringUnavailable):
            raise _loaded
        return _loaded
