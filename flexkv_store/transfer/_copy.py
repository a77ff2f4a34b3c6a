"""gather_blocks / scatter_blocks: paged KV blocks <-> a contiguous chunk, all layers per call.

Three paths give bit-identical results. CUDA caches use the kernel in ``csrc/block_copy.cu``
when it builds; CPU caches with a CPU chunk the C routine in ``csrc/block_copy_cpu.c`` (one
call for every plane, see :mod:`._cpu`) when it builds; everything else uses torch ops on
the blocks' bytes reinterpreted as the widest word that divides them: ``index_select(out=)``
and ``index_copy_`` run per element, and a byte-typed ``index_copy_`` is about ten times
slower than the same bytes copied as 8- or 16-byte words.
"""

from __future__ import annotations

import torch

from . import _cpu, _cuda
from ._layouts import (
    BlockIds,
    KVCaches,
    KVCacheSpec,
    Plane,
    block_index,
    check_chunk,
    check_layout,
    describe_kv_caches,
    infer_block_size,
    planes,
)

# complex128 is only a 16-byte container here: its copies move bits, never arithmetic.
_WORDS: tuple[tuple[int, torch.dtype], ...] = (
    (16, torch.complex128),
    (8, torch.int64),
    (4, torch.int32),
    (2, torch.int16),
    (1, torch.uint8),
)


def _byte_offset(t: torch.Tensor) -> int:
    return int(t.storage_offset()) * t.element_size()


def _word(*byte_values: int) -> tuple[int, torch.dtype]:
    for width, dtype in _WORDS:
        if all(v % width == 0 for v in byte_values):
            return width, dtype
    raise AssertionError("every value is a multiple of 1")


def _words(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D tensor of ``dtype`` words."""
    return t.reshape(-1).view(torch.uint8).view(dtype)


def _shared_storage_rows(
    plane_list: list[Plane], block_nbytes: int
) -> tuple[list[int], list[int]] | None:
    """Each plane's first row and row step when every plane lives in one storage as whole
    block-sized rows (a per-layer view of one big allocation), else ``None``."""
    storages = {int(p.tensor.untyped_storage().data_ptr()) for p in plane_list}
    if len(storages) != 1:
        return None
    starts = [_byte_offset(p.tensor) + p.offset for p in plane_list]
    if any(v % block_nbytes for v in (*starts, *(p.stride for p in plane_list))):
        return None
    return [v // block_nbytes for v in starts], [p.stride // block_nbytes for p in plane_list]


def _torch_copy(
    plane_list: list[Plane],
    spec: KVCacheSpec,
    index: torch.Tensor,
    chunk: torch.Tensor,
    *,
    scatter: bool,
) -> None:
    """Copy with torch ops; ``chunk`` is on the caches' device."""
    bb = spec.block_nbytes
    width, word = _word(
        bb,
        _byte_offset(chunk),
        *(_byte_offset(p.tensor) + p.offset for p in plane_list),
        *(p.stride for p in plane_list),
    )
    n = index.numel()
    e = bb // width
    idx = index.to(spec.device)
    chunk_words = _words(chunk, word)
    shared = _shared_storage_rows(plane_list, bb)
    if shared is not None:
        # One op for all planes: every call starts and joins a parallel region, and with
        # one call per plane that overhead (and any core taken by a neighbour, which stalls
        # the join) dominates; a single call runs near contiguous-copy speed.
        base = _words(plane_list[0].tensor, word)
        rows = (base.untyped_storage().nbytes() - bb) // bb + 1
        table = base.as_strided((rows, e), (e, 1), 0)
        starts = torch.tensor(shared[0], dtype=torch.int64, device=spec.device)
        steps = torch.tensor(shared[1], dtype=torch.int64, device=spec.device)
        flat = (starts[:, None] + idx[None, :] * steps[:, None]).reshape(-1)
        chunk_rows = chunk_words.view(len(plane_list) * n, e)
        if scatter:
            table.index_copy_(0, flat, chunk_rows)
        else:
            torch.index_select(table, 0, flat, out=chunk_rows)
        return
    chunk_planes = chunk_words.view(len(plane_list), n, e)
    for q, plane in enumerate(plane_list):
        base = _words(plane.tensor, word)
        blocks = base.as_strided(
            (spec.num_blocks, e),
            (plane.stride // width, 1),
            base.storage_offset() + plane.offset // width,
        )
        if scatter:
            blocks.index_copy_(0, idx, chunk_planes[q])
        else:
            torch.index_select(blocks, 0, idx, out=chunk_planes[q])


def _local_copy(
    plane_list: list[Plane],
    spec: KVCacheSpec,
    index: torch.Tensor,
    chunk: torch.Tensor,
    *,
    scatter: bool,
) -> None:
    """Copy without the CUDA kernel; ``chunk`` is on the caches' device. CPU tensors take
    the C routine (one call for all planes, however the layers are allocated) when it is
    available, everything else the torch ops."""
    if spec.device.type == "cpu":
        module = _cpu.library()
        if module is not None and _cpu.copy(
            module, plane_list, spec.block_nbytes, index, chunk, scatter=scatter
        ):
            return
    _torch_copy(plane_list, spec, index, chunk, scatter=scatter)


def _gather(
    kv_caches: KVCaches,
    spec: KVCacheSpec,
    index: torch.Tensor,
    out: torch.Tensor,
    non_blocking: bool,
) -> None:
    plane_list = planes(kv_caches, spec)
    ext = _cuda.extension() if spec.device.type == "cuda" else None
    if ext is not None:
        address = _cuda.device_address(ext, out, spec.device)
        target = out
        if address == 0:
            target = torch.empty(out.shape, dtype=out.dtype, device=spec.device)
            address = int(target.data_ptr())
        _cuda.launch(
            ext, plane_list, index, spec.block_nbytes, address, scatter=False, device=spec.device
        )
        if target is not out:
            out.copy_(target, non_blocking=non_blocking)
        elif out.device.type == "cpu" and not non_blocking:
            torch.cuda.current_stream(spec.device).synchronize()
        return
    if out.device == spec.device:
        _local_copy(plane_list, spec, index, out, scatter=False)
        return
    staged = torch.empty(out.shape, dtype=out.dtype, device=spec.device)
    _local_copy(plane_list, spec, index, staged, scatter=False)
    out.copy_(staged, non_blocking=non_blocking)


def _scatter(
    kv_caches: KVCaches,
    spec: KVCacheSpec,
    index: torch.Tensor,
    chunk: torch.Tensor,
    non_blocking: bool,
) -> None:
    plane_list = planes(kv_caches, spec)
    ext = _cuda.extension() if spec.device.type == "cuda" else None
    if ext is not None:
        address = _cuda.device_address(ext, chunk, spec.device)
        source = chunk
        if address == 0:
            source = chunk.to(spec.device, non_blocking=non_blocking)
            address = int(source.data_ptr())
        _cuda.launch(
            ext, plane_list, index, spec.block_nbytes, address, scatter=True, device=spec.device
        )
        if source is chunk and chunk.device.type == "cpu" and not non_blocking:
            torch.cuda.current_stream(spec.device).synchronize()
        return
    source = chunk
    if chunk.device != spec.device:
        source = chunk.to(spec.device, non_blocking=non_blocking)
    _local_copy(plane_list, spec, index, source, scatter=True)


def gather_blocks(
    kv_caches: KVCaches,
    block_ids: BlockIds,
    out: torch.Tensor,
    layout: str,
    *,
    block_size: int | None = None,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Copy blocks ``block_ids`` of every layer of ``kv_caches`` into the chunk ``out``.

    ``kv_caches`` is the engine's list of per-layer caches in ``layout`` (one of ``LAYOUTS``;
    ``(k, v)`` pairs for ``"sglang"``). ``out`` must be a contiguous tensor of the caches'
    dtype shaped ``chunk_shape(kv_caches, len(block_ids), layout)``: ``[2, L, T, H, D]``, or
    ``[L, T, D]`` for MLA, with ``T = len(block_ids) * block_size``; it may live on the caches'
    device or, for CUDA caches, in (preferably pinned) host memory. Repeated ids are allowed.
    For sglang the block size is taken from ``out`` unless ``block_size`` is given.

    With CUDA caches and a host ``out``, the call returns once ``out`` is filled unless
    ``non_blocking=True``; then synchronize the current stream before reading it.
    Returns ``out``. Raises ``TypeError``/``ValueError`` naming the argument and rule broken.
    """
    name = check_layout(layout)
    ids = block_index(block_ids, unique=False)
    if name == "sglang" and block_size is None:
        block_size = infer_block_size("out", out, len(ids))
    spec = describe_kv_caches(kv_caches, name, block_size=block_size)
    ids.check_range(spec.num_blocks)
    check_chunk("out", out, spec, len(ids))
    _gather(kv_caches, spec, ids.index, out, non_blocking)
    return out


def scatter_blocks(
    chunk: torch.Tensor,
    kv_caches: KVCaches,
    block_ids: BlockIds,
    layout: str,
    *,
    block_size: int | None = None,
    non_blocking: bool = False,
) -> None:
    """Write the chunk ``chunk`` back into blocks ``block_ids`` of every layer of ``kv_caches``.

    The inverse of :func:`gather_blocks`, with the same shapes and rules, except that the ids
    must be distinct (a block cannot receive two chunk positions). With CUDA caches and a host
    ``chunk`` the call returns once ``chunk`` has been read unless ``non_blocking=True``; then
    synchronize the current stream before modifying or reusing it.
    """
    name = check_layout(layout)
    ids = block_index(block_ids, unique=True)
    if name == "sglang" and block_size is None:
        block_size = infer_block_size("chunk", chunk, len(ids))
    spec = describe_kv_caches(kv_caches, name, block_size=block_size)
    ids.check_range(spec.num_blocks)
    check_chunk("chunk", chunk, spec, len(ids))
    _scatter(kv_caches, spec, ids.index, chunk, non_blocking)
