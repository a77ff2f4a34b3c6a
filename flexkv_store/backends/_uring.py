"""Build and load the cffi io_uring wrappers (``csrc/uring_engine.c``) at run time.

Installing flexkv-store never compiles anything: the fs adapter calls :func:`load` when it
opens with ``io_engine`` ``auto`` or ``io_uring``. The first call in a process compiles the
wrappers with cffi in API mode (gcc, the Python headers and liburing-dev are needed, ~1 s)
into a cache directory keyed by a hash of the sources and the cffi version, so later
processes just import the shared object. Every failure (no compiler, no liburing, no source
tree, a kernel without io_uring) becomes :class:`UringUnavailable` with the reason; the
adapter then falls back to the threads engine and logs that reason once.

Cache directory: ``$FLEXKV_STORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/flexkv_store``, else
``~/.cache/flexkv_store``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any

from flexkv_store._paths import csrc_dir

__all__ = ["UringLib", "UringUnavailable", "cache_dir", "load", "source_dir"]

_MODULE_PREFIX = "_flexkv_uring_"
#: cffi needs ``struct iovec`` spelled out; ``...`` lets the compiler supply its real layout.
_CDEF_PRELUDE = "struct iovec { void *iov_base; size_t iov_len; ...; };\n"


class UringUnavailable(RuntimeError):
    """The io_uring engine cannot be used here; ``str(exc)`` says why."""


class UringLib:
    """The loaded cffi module: ``ffi`` (types, buffers) and ``lib`` (the C wrappers)."""

    def __init__(self, ffi: Any, lib: Any, path: Path) -> None:
        self.ffi = ffi
        self.lib = lib
        self.path = path


_lock = threading.Lock()
_loaded: UringLib | UringUnavailable | None = None


def source_dir() -> Path:
    """Where ``uring_engine.c`` and ``uring_engine.h`` live (see :func:`csrc_dir`)."""
    return csrc_dir()


def cache_dir() -> Path:
    """Directory holding compiled engines, one file per source hash."""
    explicit = os.environ.get("FLEXKV_STORE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "flexkv_store"


def _sources() -> tuple[str, str]:
    src = source_dir()
    try:
        c_text = (src / "uring_engine.c").read_text(encoding="utf-8")
        h_text = (src / "uring_engine.h").read_text(encoding="utf-8")
    except OSError as exc:
        raise UringUnavailable(f"the C sources are not available ({exc})") from None
    return c_text, h_text


def _cdef(h_text: str) -> str:
    # The header is written to be cdef-able once its #include lines are dropped.
    decls = "\n".join(line for line in h_text.splitlines() if not line.lstrip().startswith("#"))
    return _CDEF_PRELUDE + decls


def _build(module_name: str, c_text: str, h_text: str, target_dir: Path) -> Path:
    """Compile the wrappers into ``target_dir`` and return the shared object's path."""
    try:
        import cffi  # type: ignore[import-untyped]  # no stubs: types-cffi is not a dependency
    except ImportError as exc:
        raise UringUnavailable(f"cffi is not installed ({exc})") from None
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        raise UringUnavailable("the Python development headers (Python.h) are not installed")
    if shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None:
        raise UringUnavailable("no C compiler (gcc/cc) on PATH")
    ffi = cffi.FFI()
    ffi.cdef(_cdef(h_text))
    ffi.set_source(
        module_name,
        c_text,
        libraries=["uring"],
        include_dirs=[str(source_dir())],
        extra_compile_args=["-O2", "-Wall"],
    )
    target_dir.mkdir(parents=True, exist_ok=True)
    # Compile in a private directory and rename the result into place, so processes that
    # build at the same moment never load each other's half-written object.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target_dir) as tmp:
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        except Exception as exc:  # cffi raises VerificationError, distutils/setuptools errors
            detail = str(exc).strip().splitlines()
            hint = (
                "" if Path("/usr/include/liburing.h").exists() else " (is liburing-dev installed?)"
            )
            raise UringUnavailable(
                f"compiling the io_uring wrappers failed{hint}: {detail[-1] if detail else exc}"
            ) from None
        final = target_dir / built.name
        os.replace(built, final)
    return final


def _import(module_name: str, path: Path) -> UringLib:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UringUnavailable(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise UringUnavailable(f"cannot load {path} ({exc})") from None
    return UringLib(module.ffi, module.lib, path)


def _load_uncached() -> UringLib:
    if not sys.platform.startswith("linux"):
        raise UringUnavailable(f"io_uring needs Linux (this is {sys.platform})")
    c_text, h_text = _sources()
    import cffi  # type: ignore[import-untyped]

    digest = hashlib.sha256(
        "\0".join((c_text, h_text, cffi.__version__, _CDEF_PRELUDE)).encode()
    ).hexdigest()[:16]
    module_name = _MODULE_PREFIX + digest
    target_dir = cache_dir()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = target_dir / (module_name + suffix)
    if not path.exists():
        path = _build(module_name, c_text, h_text, target_dir)
    lib = _import(module_name, path)
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
