"""The C block copy for CPU caches (``csrc/block_copy_cpu.c``): build, load and call.

The torch path issues one ``index_select``/``index_copy_`` per plane (layer and K/V) when the
layers are separate tensors, and each of those opens and joins a parallel region: with 64
planes of a 32-layer model that overhead halves the throughput. The C routine does every
``memcpy`` of a call in one foreign call with the GIL released, in one OpenMP parallel region
(as many threads as torch's intra-op pool, fewer for small copies; torch's own libgomp where
torch ships one, so the copies reuse its hot workers) whose threads claim page-aligned pieces
of the chunk dynamically. It runs at contiguous-``copy_`` speed however the layers are
allocated, views of one tensor included.

It is compiled on first use through :mod:`flexkv_store._cbuild` into the same cache as the
io_uring engine, keyed by a hash of the source and options. When that fails (no compiler, no
OpenMP, no Python headers, no source tree) the reason is logged once and the copies use the
torch path; ``FLEXKV_STORE_DISABLE_CPU_KERNEL=1`` selects the torch path outright. A forked
child copies on one thread (libgomp cannot start a parallel region there).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Literal

import torch

from flexkv_store import _cbuild

from ._layouts import Plane

logger = logging.getLogger("flexkv_store.transfer")

_SOURCE = "block_copy_cpu.c"
_MODULE_PREFIX = "_flexkv_block_copy_cpu_"
_CDEF = """
int fkv_block_copy(const uint64_t *planes, size_t num_planes, const int64_t *ids,
                   size_t num_ids, size_t block_nbytes, size_t stride, uint64_t chunk,
                   int scatter, int num_threads);
"""
_COMPILE_ARGS = ("-O2", "-Wall", "-fopenmp")
_LINK_ARGS = ("-fopenmp",)
#: Below this many bytes per thread, another thread costs more than it saves.
MIN_BYTES_PER_THREAD = 1 << 20

CpuPath = Literal["c", "torch"]

_lock = threading.Lock()
_loaded = False
_module: _cbuild.CModule | None = None
_reason: str | None = None


def _load() -> _cbuild.CModule:
    (c_text,) = _cbuild.read_sources(_SOURCE)
    name = _cbuild.module_name(_MODULE_PREFIX, c_text, _CDEF, *_COMPILE_ARGS, *_LINK_ARGS)
    return _cbuild.load_module(
        name,
        lambda target: _cbuild.compile_module(
            name,
            c_text,
            _CDEF,
            target,
            what="the CPU block copy",
            extra_compile_args=_COMPILE_ARGS,
            extra_link_args=_LINK_ARGS,
        ),
    )


def library() -> _cbuild.CModule | None:
    """The loaded C block copy, or ``None`` when it is disabled or cannot be built.

    Builds on the first call in a process (about a second, cached on disk afterwards); a
    failure is logged once and remembered.
    """
    global _loaded, _module, _reason
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        if os.environ.get("FLEXKV_STORE_DISABLE_CPU_KERNEL"):
            _module, _reason = None, "disabled by FLEXKV_STORE_DISABLE_CPU_KERNEL"
        else:
            try:
                _module, _reason = _load(), None
            except (_cbuild.CBuildError, OSError) as exc:
                _module, _reason = None, str(exc)
                logger.warning(
                    "C block copy unavailable, using the torch path for CPU tensors: %s", exc
                )
        _loaded = True
        return _module


def cpu_path() -> CpuPath:
    """Which path gather/scatter take for CPU tensors: ``"c"`` (the C routine) or
    ``"torch"`` (the fallback), building the C routine if needed."""
    return "c" if library() is not None else "torch"


def cpu_path_note() -> str | None:
    """Why the torch path is in use for CPU tensors, or ``None`` when the C routine is."""
    library()
    return _reason


def copy(
    module: _cbuild.CModule,
    plane_list: list[Plane],
    block_nbytes: int,
    index: torch.Tensor,
    chunk: torch.Tensor,
    *,
    scatter: bool,
) -> bool:
    """Copy ``index``'s blocks of every plane to (or, with ``scatter``, from) ``chunk``, all
    CPU tensors, in one C call; ``False`` (nothing copied) if the planes' strides differ."""
    stride = plane_list[0].stride
    if any(p.stride != stride for p in plane_list):
        return False
    ids = index.contiguous()
    n = ids.numel()
    total = len(plane_list) * n * block_nbytes
    threads = max(1, min(torch.get_num_threads(), total // MIN_BYTES_PER_THREAD))
    ffi, lib = module.ffi, module.lib
    addresses = ffi.new("uint64_t[]", [p.tensor.data_ptr() + p.offset for p in plane_list])
    lib.fkv_block_copy(
        addresses,
        len(plane_list),
        ffi.cast("const int64_t *", ids.data_ptr()),
        n,
        block_nbytes,
        stride,
        chunk.data_ptr(),
        1 if scatter else 0,
        threads,
    )
    return True
