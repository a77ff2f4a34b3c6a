"""The CUDA block-copy kernel (``csrc/block_copy.cu``): build, load and launch.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` into a build
directory under the user's cache that is keyed by the sources and the torch/CUDA versions, so
later processes load it without compiling. Any failure is logged once and the callers use the
torch path instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from flexkv_store import _paths

from ._layouts import Plane

logger = logging.getLogger("flexkv_store.transfer")

_SOURCES = ("block_copy.cu", "block_copy_binding.cpp")
_HEADERS = ("block_copy.h",)
_EXTENSION_NAME = "flexkv_store_block_copy"

_lock = threading.Lock()
_loaded = False
_extension: Any = None


def csrc_dir() -> Path:
    """Where the kernel sources live (see :func:`flexkv_store._paths.csrc_dir`)."""
    return _paths.csrc_dir()


def cache_dir() -> Path:
    """Root of flexkv-store's build cache (``$XDG_CACHE_HOME/flexkv_store`` by default)."""
    override = os.environ.get("FLEXKV_STORE_CACHE_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "flexkv_store"


def _build_dir(src: Path) -> Path:
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update(name.encode())
        digest.update((src / name).read_bytes())
    # A torch or CUDA upgrade changes the C++ ABI the binding was built against.
    digest.update(f"{torch.__version__}|{torch.version.cuda}".encode())
    return cache_dir() / "torch_extensions" / f"block_copy-{digest.hexdigest()[:16]}"


def _build() -> Any:
    from torch.utils import cpp_extension

    src = csrc_dir()
    missing = [name for name in (*_SOURCES, *_HEADERS) if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources missing from {src}: {', '.join(missing)}")
    build_dir = _build_dir(src)
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=_EXTENSION_NAME,
        sources=[str(src / name) for name in _SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=str(build_dir),
        verbose=False,
    )


def extension() -> Any:
    """The loaded kernel extension, or ``None`` without CUDA or when the build failed.

    Builds on the first call in a process (seconds to a minute, cached on disk afterwards);
    set ``FLEXKV_STORE_DISABLE_CUDA_KERNEL=1`` to always use the torch path.
    """
    global _loaded, _extension
    if _loaded:
        return _extension
    with _lock:
        if _loaded:
            return _extension
        if os.environ.get("FLEXKV_STORE_DISABLE_CUDA_KERNEL") or not torch.cuda.is_available():
            _extension = None
        else:
            try:
                _extension = _build()
            except Exception as exc:  # a broken toolchain must not break the copies
                logger.warning(
                    "CUDA block-copy kernel unavailable, using the torch path instead: %s", exc
                )
                _extension = None
        _loaded = True
        return _extension


def kernel_available() -> bool:
    """Whether gather/scatter on CUDA tensors use the CUDA kernel (building it if needed)."""
    return extension() is not None


def device_address(ext: Any, tensor: torch.Tensor, device: torch.device) -> int:
    """Address through which a kernel on ``device`` reaches ``tensor``'s data, or 0."""
    if tensor.device == device:
        return int(tensor.data_ptr())
    if tensor.device.type == "cpu":
        # Pinned memory is mapped into the device's address space (the same address under
        # UVA); pageable memory gets 0 and is staged by the caller.
        return int(ext.device_pointer(tensor.data_ptr()))
    return 0


def _vector_width(*values: int) -> int:
    width = 16
    for v in values:
        while v % width:
            width //= 2
    return width


def launch(
    ext: Any,
    planes: list[Plane],
    index: torch.Tensor,
    block_nbytes: int,
    chunk_address: int,
    *,
    scatter: bool,
    device: torch.device,
) -> None:
    """Enqueue one kernel that copies ``index``'s blocks of every plane on the current stream."""
    addresses = [int(p.tensor.data_ptr()) + p.offset for p in planes]
    strides = {p.stride for p in planes}
    if len(strides) != 1:
        raise ValueError("kv_caches: every plane must have the same block stride")
    (stride,) = strides
    # One host-to-device transfer carries both the plane table and the block ids.
    meta = torch.empty(len(addresses) + index.numel(), dtype=torch.int64)
    meta[: len(addresses)] = torch.tensor(addresses, dtype=torch.int64)
    meta[len(addresses) :] = index
    width = _vector_width(block_nbytes, stride, chunk_address, *addresses)
    with torch.cuda.device(device):
        meta_dev = meta.to(device)
        ext.block_copy(
            meta_dev.data_ptr(),
            meta_dev.data_ptr() + 8 * len(addresses),
            len(addresses),
            index.numel(),
            block_nbytes,
            stride,
            chunk_address,
            scatter,
            width,
            torch.cuda.current_stream(device).cuda_stream,
        )
