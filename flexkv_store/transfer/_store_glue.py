"""``Store.put_blocks`` / ``Store.get_blocks``: paged KV blocks <-> stored chunks.

Chunks are gathered into (pinned, when CUDA is present) buffers from the store's pool and
written as one batch; loads read straight into pooled buffers (``get_into``) and are
scattered back. Kept here so that ``flexkv_store.store`` does not import torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from flexkv_store.backends.base import check_key
from flexkv_store.errors import BufferTooSmallError
from flexkv_store.keyformat import ObjectKey
from flexkv_store.transfer._copy import gather_blocks, scatter_blocks
from flexkv_store.transfer._layouts import describe_kv_caches
from flexkv_store.transfer._pool import BufferPool

if TYPE_CHECKING:
    from flexkv_store.store import Store

__all__ = ["get_blocks", "put_blocks"]

log = logging.getLogger(__name__)

#: Bytes of chunk buffers a store keeps for block copies (allocated on demand, reused).
DEFAULT_POOL_BYTES = 1 << 30


def _ids(block_ids: Sequence[int] | Any) -> list[int]:
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1:
            raise ValueError("block_ids: must be one-dimensional")
        return [int(b) for b in block_ids.tolist()]
    return [int(b) for b in block_ids]


def _split(
    keys: Sequence[ObjectKey], block_ids: Sequence[int] | Any
) -> tuple[list[ObjectKey], list[int], int]:
    ks = [check_key(k) for k in keys]
    ids = _ids(block_ids)
    if not ks:
        raise ValueError("keys: need at least one chunk key")
    if not ids or len(ids) % len(ks):
        raise ValueError(
            f"block_ids: {len(ids)} blocks do not divide into {len(ks)} chunks; "
            "len(block_ids) must be a positive multiple of len(keys)"
        )
    return ks, ids, len(ids) // len(ks)


def pool_of(store: Store) -> BufferPool:
    """The store's chunk buffer pool, made on first use."""
    pool: BufferPool | None = getattr(store, "_block_pool", None)
    if pool is None:
        pool = BufferPool(DEFAULT_POOL_BYTES)
        store._block_pool = pool  # type: ignore[attr-defined]
    return pool


def _groups(n: int, chunk_nbytes: int, pool: BufferPool) -> list[range]:
    """Chunk index ranges whose buffers fit in the pool at once."""
    per = max(1, min(n, pool.capacity_bytes // max(1, chunk_nbytes)))
    return [range(i, min(n, i + per)) for i in range(0, n, per)]


async def put_blocks(
    store: Store,
    keys: Sequence[ObjectKey],
    kv_caches: Sequence[Any],
    block_ids: Sequence[int] | Any,
    layout: str,
    *,
    block_size: int | None = None,
) -> None:
    """Gather chunk ``i`` (blocks ``block_ids[i*b:(i+1)*b]``) and store it as ``keys[i]``."""
    ks, ids, b = _split(keys, block_ids)
    spec = describe_kv_caches(kv_caches, layout, block_size=block_size)
    shape = spec.chunk_shape(b)
    nbytes = spec.chunk_nbytes(b)
    pool = pool_of(store)
    for group in _groups(len(ks), nbytes, pool):
        buf = await pool.acquire_async((len(group), *shape), spec.dtype)
        try:
            for j, i in enumerate(group):
                gather_blocks(
                    kv_caches, ids[i * b : (i + 1) * b], buf[j], layout, block_size=spec.block_size
                )
            await store.put_many([(ks[i], buf[j]) for j, i in enumerate(group)])
        finally:
            pool.release(buf)


async def _read(store: Store, key: ObjectKey, out: torch.Tensor) -> int | None:
    try:
        return await store.get_into(key, out)
    except BufferTooSmallError as exc:
        return exc.needed  # larger than the layout's chunk: reported as a mismatch


async def get_blocks(
    store: Store,
    keys: Sequence[ObjectKey],
    kv_caches: Sequence[Any],
    block_ids: Sequence[int] | Any,
    layout: str,
    *,
    block_size: int | None = None,
) -> int:
    """Load the leading chunks that exist into their blocks; how many were loaded.

    Stops at the first chunk that is missing (or whose size does not match the caches'
    layout, e.g. another dtype), so the caller recomputes from there.
    """
    ks, ids, b = _split(keys, block_ids)
    spec = describe_kv_caches(kv_caches, layout, block_size=block_size)
    shape = spec.chunk_shape(b)
    nbytes = spec.chunk_nbytes(b)
    present = await store.lookup_prefix(ks)
    if present == 0:
        return 0
    pool = pool_of(store)
    loaded = 0
    for group in _groups(present, nbytes, pool):
        buf = await pool.acquire_async((len(group), *shape), spec.dtype)
        try:
            sizes = await asyncio.gather(
                *(_read(store, ks[i], buf[j]) for j, i in enumerate(group))
            )
            for j, i in enumerate(group):
                if sizes[j] != nbytes:
                    if sizes[j] is not None:
                        log.warning(
                            "chunk %s has %s bytes, the caches' layout needs %d: not loaded",
                            ks[i].to_wire(), sizes[j], nbytes,
                        )  # fmt: skip
                    return loaded
                scatter_blocks(
                    buf[j], kv_caches, ids[i * b : (i + 1) * b], layout, block_size=spec.block_size
                )
                loaded += 1
        finally:
            pool.release(buf)
    return loaded
