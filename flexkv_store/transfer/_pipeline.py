"""The copies of ``Store.put_blocks`` / ``Store.get_blocks``, off the event loop.

:class:`BlockCopier` validates one call's caches, block ids and layout once, then gathers a
chunk into a pooled buffer (or scatters one back) in a worker thread, so the engine's event
loop never waits for a copy. The store drives it: it gathers the next chunks while the
ones gathered before are written (at most :attr:`BlockCopier.write_depth` chunks held), and
reads chunk ``i + 1`` while chunk ``i`` is scattered (at most :attr:`BlockCopier.depth`
chunks in flight); both are bounded by the buffer pool. This module never imports the
store: the store calls the transfer layer, not the other way round.

Copies run one at a time on one worker thread per process (the shared pool ``flexkv-copy``): each is
memory-bound and already spreads over every core (the C routine's OpenMP team, or torch's
intra-op pool), so two at once would only share the bandwidth. With CUDA caches the copy is
issued on the stream that was current when the copier was made (the engine's), and the
worker waits for it, so a gathered buffer is complete when :meth:`BlockCopier.gather`
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from flexkv_store._aio import settle
from flexkv_store._threads import shared_pool
from flexkv_store.transfer._copy import gather_blocks, scatter_blocks
from flexkv_store.transfer._layouts import describe_kv_caches
from flexkv_store.transfer._pool import BufferPool

__all__ = ["MAX_DEPTH", "BlockCopier", "split_block_ids"]

_T = TypeVar("_T")

#: Chunks of one ``get_blocks`` call in flight at most: enough to keep a scatter and the
#: reads of the chunks around it busy; more only holds buffers.
MAX_DEPTH = 4
#: Bytes of chunks one ``put_blocks`` call holds at most (gathered, or being written):
#: the store writes a salt's chunks one batch at a time, so the chunks gathered during one
#: batch's writes must be enough to keep the backend busy with the next (measured on the
#: fs adapter with 32 MiB chunks: 4 chunks 0.68x, 8 chunks 0.89x, 16 chunks 0.93x of a
#: ``put_many`` of ready buffers).
MAX_WRITE_BYTES = 512 << 20


def _copy_thread() -> ThreadPoolExecutor:
    return shared_pool("flexkv-copy", 1)


def split_block_ids(num_chunks: int, block_ids: Sequence[int] | Any) -> tuple[list[int], int]:
    """``block_ids`` as ints and the blocks per chunk; ``ValueError`` if they do not divide."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1:
            raise ValueError("block_ids: must be one-dimensional")
        ids = [int(b) for b in block_ids.tolist()]
    else:
        ids = [int(b) for b in block_ids]
    if num_chunks <= 0:
        raise ValueError("keys: need at least one chunk key")
    if not ids or len(ids) % num_chunks:
        raise ValueError(
            f"block_ids: {len(ids)} blocks do not divide into {num_chunks} chunks; "
            "len(block_ids) must be a positive multiple of len(keys)"
        )
    return ids, len(ids) // num_chunks


class BlockCopier:
    """Gathers and scatters the chunks of one ``put_blocks`` / ``get_blocks`` call.

    Chunk ``i`` covers ``block_ids[i*b:(i+1)*b]`` with ``b = len(block_ids) // num_chunks``.
    Buffers come from ``pool`` and must be handed back with :meth:`release`.
    """

    def __init__(
        self,
        pool: BufferPool,
        kv_caches: Sequence[Any],
        block_ids: Sequence[int] | Any,
        layout: str,
        num_chunks: int,
        *,
        block_size: int | None = None,
    ) -> None:
        self._ids, self._per_chunk = split_block_ids(num_chunks, block_ids)
        self._caches = kv_caches
        self._layout = layout
        self._spec = describe_kv_caches(kv_caches, layout, block_size=block_size)
        self._shape = self._spec.chunk_shape(self._per_chunk)
        #: Bytes of one chunk.
        self.chunk_nbytes: int = self._spec.chunk_nbytes(self._per_chunk)
        self._pool = pool
        #: Chunks in flight at most (what the pool can hold at once, up to MAX_DEPTH).
        self.depth = max(1, min(num_chunks, MAX_DEPTH, pool.capacity_bytes // self.chunk_nbytes))
        #: Chunks gathered or being written at most in a put (at least :attr:`depth`, up
        #: to MAX_WRITE_BYTES, within what the pool can hold at once).
        self.write_depth = max(
            1,
            min(
                num_chunks,
                pool.capacity_bytes // self.chunk_nbytes,
                max(MAX_DEPTH, MAX_WRITE_BYTES // self.chunk_nbytes),
            ),
        )
        first = kv_caches[0]
        tensor = first[0] if isinstance(first, (tuple, list)) else first
        self._stream = (
            torch.cuda.current_stream(tensor.device)
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda
            else None
        )

    def _blocks(self, i: int) -> list[int]:
        return self._ids[i * self._per_chunk : (i + 1) * self._per_chunk]

    async def gather(self, i: int) -> torch.Tensor:
        """A pooled buffer holding chunk ``i``, gathered in the copy thread."""
        buf = await self._pool.acquire_async(self._shape, self._spec.dtype)
        try:
            await self._off_loop(self._gather, i, buf)
        except BaseException:
            self._pool.release(buf)
            raise
        return buf

    @property
    def host_caches(self) -> bool:
        """Whether the caches are in host memory (so any host buffer serves as well as a
        pinned pooled one)."""
        return self._stream is None

    def wrap(self, view: memoryview) -> torch.Tensor:
        """A chunk-shaped tensor over ``view`` (``chunk_nbytes`` writable bytes)."""
        if view.nbytes != self.chunk_nbytes:
            raise ValueError(f"buffer: {view.nbytes} bytes, a chunk needs {self.chunk_nbytes}")
        return torch.frombuffer(view, dtype=self._spec.dtype).view(self._shape)

    async def gather_into(self, i: int, buf: torch.Tensor) -> None:
        """Gather chunk ``i`` into the caller's ``buf`` (from :meth:`wrap`), in the copy
        thread."""
        await self._off_loop(self._gather, i, buf)

    async def buffer(self) -> torch.Tensor:
        """A pooled buffer for one chunk, to read into (contents undefined)."""
        return await self._pool.acquire_async(self._shape, self._spec.dtype)

    async def scatter(self, i: int, buf: torch.Tensor) -> None:
        """Write ``buf`` (chunk ``i``) into its blocks, in the copy thread."""
        await self._off_loop(self._scatter, i, buf)

    def release(self, buf: torch.Tensor) -> None:
        self._pool.release(buf)

    def _gather(self, i: int, buf: torch.Tensor) -> None:
        with self._on_stream():
            gather_blocks(
                self._caches, self._blocks(i), buf, self._layout, block_size=self._spec.block_size
            )

    def _scatter(self, i: int, buf: torch.Tensor) -> None:
        with self._on_stream():
            scatter_blocks(
                buf, self._caches, self._blocks(i), self._layout, block_size=self._spec.block_size
            )
            if self._stream is not None:
                self._stream.synchronize()  # the buffer is read before it goes back

    def _on_stream(self) -> Any:
        if self._stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)

    async def _off_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        # settle: the copy thread uses the buffer and the caches until it is done, so a
        # cancelled caller gets control back (and releases the buffer) only after that.
        loop = asyncio.get_running_loop()
        return await settle(loop.run_in_executor(_copy_thread(), fn, *args))
