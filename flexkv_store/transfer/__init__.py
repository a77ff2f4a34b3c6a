"""Block copies between engines' paged KV caches and contiguous chunks.

Layouts (per layer; ``kv_caches`` is the list of them):

- ``"vllm"``: ``[2, num_blocks, block_size, H, D]`` (flash-attn)
- ``"flashinfer"``: ``[num_blocks, 2, block_size, H, D]``
- ``"mla"``: ``[num_blocks, block_size, D]``
- ``"sglang"``: a ``(k, v)`` pair of ``[num_blocks * block_size, H, D]``

A chunk is ``[2, num_layers, T, H, D]`` (MLA: ``[num_layers, T, D]``) with
``T = len(block_ids) * block_size``. :func:`gather_blocks` fills a chunk from blocks and
:func:`scatter_blocks` writes one back, all layers in one call; CUDA caches use the kernel in
``csrc/block_copy.cu`` (straight into pinned host memory), other tensors a torch path, with
bit-identical results. :class:`BufferPool` keeps reusable pinned chunk buffers.

This subpackage imports torch; ``import flexkv_store`` does not import it.
"""

from ._copy import gather_blocks, scatter_blocks
from ._cpu import cpu_path, cpu_path_note
from ._cuda import kernel_available
from ._layouts import (
    LAYOUTS,
    BlockIds,
    KVCaches,
    KVCacheSpec,
    LayoutName,
    chunk_nbytes,
    chunk_shape,
    describe_kv_caches,
)
from ._pool import BufferPool

__all__ = [
    "BlockIds",
    "BufferPool",
    "KVCacheSpec",
    "KVCaches",
    "LAYOUTS",
    "LayoutName",
    "chunk_nbytes",
    "chunk_shape",
    "cpu_path",
    "cpu_path_note",
    "describe_kv_caches",
    "gather_blocks",
    "kernel_available",
    "scatter_blocks",
]
