"""Build and load small cffi (API mode) C modules from ``csrc/`` at run time.

Installing flexkv-store never compiles anything. The first process that needs a module
compiles it with cffi (gcc and the Python headers are needed, about a second) into a cache
directory, under a name keyed by a hash of everything that goes into the build (sources,
declarations, options, cffi version), so later processes only import the shared object.
Every failure becomes :class:`CBuildError` with a one-line reason; the callers (the io_uring
engine, the CPU block copies) turn it into their own fallback and log it once.

Cache directory: ``$FLEXKV_STORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/flexkv_store``, else
``~/.cache/flexkv_store``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flexkv_store._paths import csrc_dir

__all__ = [
    "CBuildError",
    "CModule",
    "cache_dir",
    "cdef_from_header",
    "compile_module",
    "import_module",
    "load_module",
    "module_name",
    "module_path",
    "read_sources",
]


class CBuildError(RuntimeError):
    """A C module cannot be built or loaded here; ``str(exc)`` says why."""


class CModule:
    """A loaded cffi module: ``ffi`` (types, buffers) and ``lib`` (the C functions)."""

    def __init__(self, ffi: Any, lib: Any, path: Path) -> None:
        self.ffi = ffi
        self.lib = lib
        self.path = path


def cache_dir() -> Path:
    """Directory holding compiled modules, one file per build hash."""
    explicit = os.environ.get("FLEXKV_STORE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "flexkv_store"


def read_sources(*names: str) -> tuple[str, ...]:
    """The texts of ``names`` in :func:`flexkv_store._paths.csrc_dir`."""
    src = csrc_dir()
    try:
        return tuple((src / name).read_text(encoding="utf-8") for name in names)
    except OSError as exc:
        raise CBuildError(f"the C sources are not available ({exc})") from None


def cdef_from_header(h_text: str, prelude: str = "") -> str:
    """A header written to be cdef-able once its preprocessor lines are dropped."""
    decls = "\n".join(line for line in h_text.splitlines() if not line.lstrip().startswith("#"))
    return prelude + decls


def module_name(prefix: str, *parts: str) -> str:
    """``prefix`` plus a hash of ``parts`` (everything the build depends on) and cffi's
    version."""
    try:
        import cffi  # type: ignore[import-untyped]  # no stubs: types-cffi is not a dependency
    except ImportError as exc:
        raise CBuildError(f"cffi is not installed ({exc})") from None
    digest = hashlib.sha256("\0".join((*parts, cffi.__version__)).encode()).hexdigest()[:16]
    return prefix + digest


def module_path(name: str, target_dir: Path | None = None) -> Path:
    """Where the shared object of module ``name`` lives (whether or not it is built yet)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return (target_dir or cache_dir()) / (name + suffix)


def compile_module(
    name: str,
    c_text: str,
    cdef: str,
    target_dir: Path,
    *,
    what: str,
    libraries: Sequence[str] = (),
    extra_compile_args: Sequence[str] = ("-O2", "-Wall"),
    extra_link_args: Sequence[str] = (),
    hint: str = "",
) -> Path:
    """Compile ``c_text`` as cffi module ``name`` into ``target_dir``; return its path.

    ``what`` names the module in error messages; ``hint`` is appended to a compile failure.
    """
    try:
        import cffi
    except ImportError as exc:
        raise CBuildError(f"cffi is not installed ({exc})") from None
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        raise CBuildError("the Python development headers (Python.h) are not installed")
    if shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None:
        raise CBuildError("no C compiler (gcc/cc) on PATH")
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(
        name,
        c_text,
        libraries=list(libraries),
        include_dirs=[str(csrc_dir())],
        extra_compile_args=list(extra_compile_args),
        extra_link_args=list(extra_link_args),
    )
    target_dir.mkdir(parents=True, exist_ok=True)
    # Compile in a private directory and rename the result into place, so processes that
    # build at the same moment never load each other's half-written object.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target_dir) as tmp:
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        except Exception as exc:  # cffi raises VerificationError, distutils/setuptools errors
            detail = str(exc).strip().splitlines()
            raise CBuildError(
                f"compiling {what} failed{hint}: {detail[-1] if detail else exc}"
            ) from None
        final = target_dir / built.name
        os.replace(built, final)
    return final


def import_module(name: str, path: Path) -> CModule:
    """Import the compiled module ``name`` from ``path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CBuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise CBuildError(f"cannot load {path} ({exc})") from None
    return CModule(module.ffi, module.lib, path)


def load_module(name: str, build: Callable[[Path], Path]) -> CModule:
    """Import module ``name`` from the cache, first calling ``build(cache_dir())`` (which
    returns the shared object's path, e.g. through :func:`compile_module`) if it is not
    there yet."""
    target_dir = cache_dir()
    path = module_path(name, target_dir)
    if not path.exists():
        path = build(target_dir)
    return import_module(name, path)
