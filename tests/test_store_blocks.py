"""``Store.put_blocks`` / ``Store.get_blocks``: round trips in every layout, copies off the
event loop, a gather overlapping the writes before it, and loads that stop cleanly."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest
import torch
from test_transfer import block, make_caches, zeros_like_caches

from flexkv_store.backends._memory import MemoryAdapter
from flexkv_store.errors import StorageError
from flexkv_store.keyformat import ObjectKey
from flexkv_store.store import Store
from flexkv_store.transfer import LAYOUTS, _pipeline
from flexkv_store.transfer._pool import BufferPool

BS, H, D, LAYERS, NB = 4, 2, 8, 3, 32


def _keys(n: int, salt: str = "") -> list[ObjectKey]:
    return [ObjectKey("m", 0, bytes([i + 1]), salt) for i in range(n)]


def _same_blocks(a: list[Any], b: list[Any], layout: str, ids: list[int]) -> bool:
    planes = 1 if layout == "mla" else 2

    def bits(caches: list[Any], layer: int, kv: int, i: int) -> torch.Tensor:
        # bit patterns, not values: random bytes hold NaNs, which never compare equal
        return block(caches, layout, BS, layer, kv, i).contiguous().view(torch.uint8)

    return all(
        torch.equal(bits(a, layer, kv, i), bits(b, layer, kv, i))
        for layer in range(LAYERS)
        for kv in range(planes)
        for i in ids
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
async def test_round_trip_with_random_block_ids(layout: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    src = make_caches(layout, LAYERS, NB, BS, H, D, dtype, gen)
    dst = zeros_like_caches(src)
    ids = random.Random(2).sample(range(NB), 12)  # 6 chunks of 2 blocks, in any order
    bs = BS if layout == "sglang" else None
    async with Store([MemoryAdapter()]) as store:
        await store.put_blocks(_keys(6), src, ids, layout, block_size=bs)
        assert await store.get_blocks(_keys(6), dst, ids, layout, block_size=bs) == 6
        assert store._block_pool.in_use_bytes == 0
    assert _same_blocks(src, dst, layout, ids)


async def _cancel_until_done(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` at every step until it is over; it must end cancelled."""
    for _ in range(10000):
        if task.done():
            break
        task.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)


async def _pool_drained(store: Store) -> bool:
    """Whether every pooled buffer is back within a few seconds."""
    pool = store._block_pool
    for _ in range(300):
        if pool.in_use_bytes == 0:
            return True
        await asyncio.sleep(0.01)
    return False


class _Gated(MemoryAdapter):
    """A memory backend whose puts wait for a gate (the store's I/O, held up)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0

    async def put(self, key: ObjectKey, data: Any) -> None:
        self.waiting += 1
        await self.gate.wait()
        await super().put(key, data)


async def test_copies_run_off_the_loop_and_overlap_the_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []
    real_gather = getattr(_pipeline, "gather_blocks")  # noqa: B009
    real_scatter = getattr(_pipeline, "scatter_blocks")  # noqa: B009

    def gather(*args: Any, **kw: Any) -> Any:
        seen.append(("gather", threading.get_ident()))
        return real_gather(*args, **kw)

    def scatter(*args: Any, **kw: Any) -> Any:
        seen.append(("scatter", threading.get_ident()))
        return real_scatter(*args, **kw)

    monkeypatch.setattr(_pipeline, "gather_blocks", gather)
    monkeypatch.setattr(_pipeline, "scatter_blocks", scatter)
    gen = torch.Generator().manual_seed(3)
    src = make_caches("vllm", LAYERS, NB, BS, H, D, torch.float16, gen)
    backend = _Gated()
    async with Store([backend]) as store:
        task = asyncio.create_task(store.put_blocks(_keys(8), src, list(range(16)), "vllm"))
        try:
            for _ in range(300):
                if backend.waiting and sum(1 for w, _ in seen if w == "gather") >= 2:
                    break
                await asyncio.sleep(0.01)
            # The first chunk's write is held up, and the next chunk was gathered meanwhile.
            assert backend.waiting >= 1
            assert sum(1 for what, _ in seen if what == "gather") >= 2
            assert not task.done()
        finally:
            backend.gate.set()
        await task
        dst = zeros_like_caches(src)
        assert await store.get_blocks(_keys(8), dst, list(range(16)), "vllm") == 8
    assert {w for w, _ in seen} == {"gather", "scatter"}
    assert all(t != loop_thread for _, t in seen), "a copy ran on the event loop's thread"
    assert _same_blocks(src, dst, "vllm", list(range(16)))


class _Batches(MemoryAdapter):
    """A memory backend that records the size of each write it gets, holds the first one
    back until ``gate`` is set, and fails the keys in ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.batches: list[int] = []
        self.failing: set[ObjectKey] = set()

    async def put(self, key: ObjectKey, data: Any) -> None:
        (err,) = await self.put_each([(key, data)])
        if err is not None:
            raise err

    async def put_each(self, items: Any) -> list[Exception | None]:
        items = list(items)
        self.batches.append(len(items))
        await self.gate.wait()
        outcomes: list[Exception | None] = []
        for key, data in items:
            if key in self.failing:
                outcomes.append(StorageError("refused by the test"))
            else:
                await MemoryAdapter.put(self, key, data)
                outcomes.append(None)
        return outcomes


class _HeldGathers:
    """Counts finished gathers; every gather after the first waits until ``writing`` is
    set (by the backend's first write), so the first batch is exactly one chunk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.done = 0
        self.writing = threading.Event()
        real = getattr(_pipeline, "gather_blocks")  # noqa: B009

        def gather(*args: Any, **kw: Any) -> Any:
            if self.done and not self.writing.wait(timeout=30):
                raise AssertionError("the first write never started")
            out = real(*args, **kw)
            self.done += 1
            return out

        monkeypatch.setattr(_pipeline, "gather_blocks", gather)

    async def until(self, n: int) -> None:
        for _ in range(1000):
            if self.done >= n:
                return
            await asyncio.sleep(0.01)


def _held_batches(held: _HeldGathers) -> _Batches:
    backend = _Batches()
    real = backend.put_each

    async def put_each(items: Any) -> list[Exception | None]:
        held.writing.set()
        return await real(items)

    backend.put_each = put_each  # type: ignore[method-assign]
    return backend


def _held_put(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> tuple[_HeldGathers, list[Any], list[int], _Batches]:
    """Held gathers, vllm caches, 16 random block ids and a backend that holds its first
    write until ``gate`` is set (and lets the held gathers go once it has started)."""
    held = _HeldGathers(monkeypatch)
    gen = torch.Generator().manual_seed(seed)
    src = make_caches("vllm", LAYERS, NB, BS, H, D, torch.float16, gen)
    ids = random.Random(seed + 1).sample(range(NB), 16)
    return held, src, ids, _held_batches(held)


async def test_chunks_gathered_during_a_write_go_out_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One salt's writes take its lock one after another: chunks written one per call would
    # leave a single chunk's I/O in flight. Those gathered meanwhile make the next batch.
    held, src, ids, backend = _held_put(monkeypatch, 11)
    async with Store([backend]) as store:
        task = asyncio.create_task(store.put_blocks(_keys(8), src, ids, "vllm"))
        try:
            await held.until(8)
            assert held.done == 8, "the gathers waited for the write"
            assert backend.batches == [1]
        finally:
            held.writing.set()
            backend.gate.set()
        await asyncio.wait_for(task, 30)
        assert backend.batches == [1, 7]
        dst = zeros_like_caches(src)
        assert await store.get_blocks(_keys(8), dst, ids, "vllm") == 8
        assert store._block_pool.in_use_bytes == 0
    assert _same_blocks(src, dst, "vllm", ids)


async def test_a_batch_over_the_quota_keeps_its_last_chunks_without_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As with one put per chunk: later chunks evict earlier ones of the same call, which
    # is no refusal (put_blocks raised QuotaExceededError when a batch held them).
    held, src, ids, backend = _held_put(monkeypatch, 15)
    keys = _keys(8, "alice")
    chunk = 2 * LAYERS * 2 * BS * H * D * 2  # 2 blocks of fp16
    async with Store([backend], quotas={"alice": 3 * chunk}) as store:
        task = asyncio.create_task(store.put_blocks(keys, src, ids, "vllm"))
        try:
            await held.until(8)
        finally:
            held.writing.set()
            backend.gate.set()
        await asyncio.wait_for(task, 30)  # no QuotaExceededError
        assert backend.batches == [1, 3]  # of the second batch, only the last 3 fit
        assert await store.exists_many(keys) == [False] * 5 + [True] * 3
        report = store.accounting.peek("alice")
        assert report is not None and report.used == (3 * chunk, 3)
        assert store._block_pool.in_use_bytes == 0


async def test_a_put_cancelled_again_while_it_winds_down_leaks_no_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held, src, ids, backend = _held_put(monkeypatch, 17)
    async with Store([backend]) as store:
        task = asyncio.create_task(store.put_blocks(_keys(8), src, ids, "vllm"))
        try:
            await held.until(8)  # one chunk being written, seven gathered and waiting
            task.cancel()
            await asyncio.sleep(0.01)
        finally:
            held.writing.set()
            backend.gate.set()
        # Cancelled again at every step while it hands its buffers back.
        await _cancel_until_done(task)
        assert await _pool_drained(store), "a cancelled put kept pooled buffers"


async def test_a_load_cancelled_again_while_it_winds_down_leaks_no_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first scatter is held while the reads after it finish: their buffers must come
    # back however often the load is cancelled while it stops.
    scattering = threading.Event()
    release = threading.Event()
    real = getattr(_pipeline, "scatter_blocks")  # noqa: B009

    def scatter(*args: Any, **kw: Any) -> Any:
        scattering.set()
        if not release.wait(timeout=30):
            raise AssertionError("the scatter was never let go")
        return real(*args, **kw)

    monkeypatch.setattr(_pipeline, "scatter_blocks", scatter)
    gen = torch.Generator().manual_seed(19)
    src = make_caches("vllm", LAYERS, NB, BS, H, D, torch.float16, gen)
    ids = random.Random(20).sample(range(NB), 16)
    async with Store([MemoryAdapter()]) as store:
        await store.put_blocks(_keys(8), src, ids, "vllm")
        dst = zeros_like_caches(src)
        task = asyncio.create_task(store.get_blocks(_keys(8), dst, ids, "vllm"))
        try:
            for _ in range(1000):
                if scattering.is_set():
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the reads ahead finish meanwhile
            task.cancel()
        finally:
            release.set()
        await _cancel_until_done(task)
        assert await _pool_drained(store), "a cancelled load kept pooled buffers"


async def test_a_load_cancelled_as_a_read_completes_hands_its_buffer_back() -> None:
    gen = torch.Generator().manual_seed(21)
    src = make_caches("vllm", LAYERS, NB, BS, H, D, torch.float16, gen)
    ids = random.Random(22).sample(range(NB), 16)
    keys = _keys(8)
    async with Store([MemoryAdapter()]) as store:
        await store.put_blocks(keys, src, ids, "vllm")
        real = store.get_into
        load: asyncio.Task[int] | None = None

        async def get_into(key: ObjectKey, buf: Any) -> int | None:
            n = await real(key, buf)
            if key == keys[0]:
                # cancelled in the same loop pass in which the read's result wakes it
                assert load is not None
                asyncio.get_running_loop().call_soon(load.cancel)
            return n

        store.get_into = get_into  # type: ignore[method-assign, assignment]
        load = asyncio.ensure_future(store.get_blocks(keys, zeros_like_caches(src), ids, "vllm"))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(load, 30)
        assert await _pool_drained(store), "a cancelled load kept a pooled buffer"


async def test_a_chunk_refused_in_a_batch_fails_alone() -> None:
    gen = torch.Generator().manual_seed(13)
    src = make_caches("vllm", LAYERS, NB, BS, H, D, torch.float16, gen)
    ids = random.Random(14).sample(range(NB), 12)
    keys = _keys(6)
    backend = _Batches()
    backend.gate.set()
    backend.failing = {keys[4]}
    async with Store([backend]) as store:
        with pytest.raises(StorageError, match=keys[4].to_wire()):
            await store.put_blocks(keys, src, ids, "vllm")
        assert await store.lookup_prefix(keys) == 4
        assert await store.exists_many(keys) == [True] * 4 + [False, True]
        assert store._block_pool.in_use_bytes == 0


async def test_a_load_stops_at_the_first_mismatch_and_writes_nothing_after_it() -> None:
    gen = torch.Generator().manual_seed(4)
    src = make_caches("vllm", LAYERS, NB, BS, H, D, torch.float16, gen)
    ids = random.Random(5).sample(range(NB), 16)  # 8 chunks of 2 blocks
    keys = _keys(8)
    async with Store([MemoryAdapter()]) as store:
        await store.put_blocks(keys, src, ids, "vllm")
        await store.put(keys[3], b"not a chunk of this layout")  # chunk 3 has the wrong size
        dst = zeros_like_caches(src)
        assert await store.get_blocks(keys, dst, ids, "vllm") == 3
        assert _same_blocks(src, dst, "vllm", ids[:6])
        untouched = zeros_like_caches(src)
        assert _same_blocks(untouched, dst, "vllm", ids[6:]), "blocks after the miss were written"
        # A read stopped while it waited for a buffer hands it back once the pool's waiting
        # thread returns: soon, not necessarily at once.
        for _ in range(100):
            if store._block_pool.in_use_bytes == 0:
                break
            await asyncio.sleep(0.01)
        assert store._block_pool.in_use_bytes == 0, "reads in flight after the miss leaked"
        # a missing first chunk loads nothing
        assert await store.get_blocks(_keys(2, "other"), dst, ids[:4], "vllm") == 0


async def test_a_small_pool_still_moves_every_chunk() -> None:
    gen = torch.Generator().manual_seed(6)
    src = make_caches("flashinfer", LAYERS, NB, BS, H, D, torch.bfloat16, gen)
    ids = random.Random(7).sample(range(NB), 20)
    async with Store([MemoryAdapter()]) as store:
        chunk = LAYERS * 2 * 2 * BS * H * D * 2  # one chunk of 2 blocks, bf16
        store._block_pool = BufferPool(chunk)  # room for one chunk at a time: depth 1
        await asyncio.wait_for(store.put_blocks(_keys(10), src, ids, "flashinfer"), 30)
        dst = zeros_like_caches(src)
        assert await asyncio.wait_for(store.get_blocks(_keys(10), dst, ids, "flashinfer"), 30) == 10
        assert store._block_pool.in_use_bytes == 0
    assert _same_blocks(src, dst, "flashinfer", ids)


async def test_bad_arguments_are_refused_before_any_io() -> None:
    src = make_caches("vllm", 1, NB, BS, H, D, torch.float16, torch.Generator().manual_seed(0))
    async with Store([MemoryAdapter()]) as store:
        with pytest.raises(ValueError, match="block_ids"):
            await store.put_blocks(_keys(2), src, [0, 1, 2], "vllm")
        with pytest.raises(ValueError, match="keys"):
            await store.get_blocks([], src, [0, 1], "vllm")
        assert len(store.backends[0]) == 0  # type: ignore[arg-type]


def test_pooled_buffers_start_on_a_page() -> None:
    # O_DIRECT reads and writes of a pooled chunk then need no bounce copy.
    pool = BufferPool(1 << 22)
    bufs = [pool.acquire((n,), torch.uint8) for n in (1, 4097, 1 << 20)]
    assert all(b.data_ptr() % 4096 == 0 for b in bufs)
    for b in bufs:
        pool.release(b)
    assert pool.in_use_bytes == 0


def _big_caches(seed: int) -> list[torch.Tensor]:
    # vllm layout, 2 MiB chunks of 8 blocks: large enough for the memory adapter to lend.
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((2, 32, 16, 8, 128), generator=gen).half() for _ in range(4)]


class _Lender(MemoryAdapter):
    """Records what it lent."""

    def __init__(self, **config: Any) -> None:
        from flexkv_store.backends.config import MemoryConfig

        super().__init__(MemoryConfig(**config))
        self.lent: list[int] = []

    def lend(self, nbytes: int) -> memoryview | None:
        view = super().lend(nbytes)
        if view is not None:
            from flexkv_store._bytes import address_of

            self.lent.append(address_of(view))
        return view


async def test_a_lone_memory_backend_gets_blocks_gathered_in_place() -> None:
    src = _big_caches(3)
    dst = [torch.zeros_like(c) for c in src]
    ids = random.Random(4).sample(range(32), 24)
    backend = _Lender()
    async with Store([backend]) as store:
        await store.put_blocks(_keys(3), src, ids, "vllm")
        assert len(backend.lent) == 3 and not backend._lent  # lent, and every one adopted
        stored = {int(p.arr.ctypes.data) for p, _ in backend._data.values()}  # type: ignore[union-attr]
        assert stored == set(backend.lent)  # the gathers wrote the stored objects themselves
        assert store._block_pool is None or store._block_pool.held_bytes == 0
        assert await store.get_blocks(_keys(3), dst, ids, "vllm") == 3
        # ... and scattered straight from them too: the pool was never needed.
        assert store._block_pool is None or store._block_pool.held_bytes == 0
        assert all(p.readers == 0 for p, _ in backend._data.values())  # type: ignore[union-attr]
    for c_src, c_dst in zip(src, dst, strict=True):
        assert torch.equal(c_src[:, ids].view(torch.uint8), c_dst[:, ids].view(torch.uint8))


async def test_lent_memory_comes_back_when_a_put_is_refused() -> None:
    from flexkv_store.errors import QuotaExceededError

    backend = _Lender()
    ids = list(range(16))
    async with Store([backend], quotas={"alice": 1 << 20}) as store:
        with pytest.raises(QuotaExceededError):
            await store.put_blocks(_keys(2, "alice"), _big_caches(5), ids, "vllm")
        assert not backend._lent and len(backend) == 0
        assert backend.info()["recycled_bytes"] == 2 * (2 << 20)  # both buffers kept for reuse


async def test_two_backends_take_the_pooled_path() -> None:
    a, b = _Lender(), _Lender()
    src = _big_caches(6)
    async with Store([a, b]) as store:
        await store.put_blocks(_keys(2), src, list(range(16)), "vllm")
        assert a.lent == [] and b.lent == [] and len(a) == len(b) == 2


async def test_a_borrowed_load_stops_at_a_chunk_of_the_wrong_size() -> None:
    src = _big_caches(7)
    dst = [torch.zeros_like(c) for c in src]
    ids = list(range(24))
    backend = _Lender()
    async with Store([backend]) as store:
        await store.put_blocks(_keys(3), src, ids, "vllm")
        await store.put(_keys(3)[1], bytes(3 << 20))  # chunk 1 now holds 3 MiB, not 2
        assert await store.get_blocks(_keys(3), dst, ids, "vllm") == 1
    for c_src, c_dst in zip(src, dst, strict=True):
        assert torch.equal(c_src[:, :8].view(torch.uint8), c_dst[:, :8].view(torch.uint8))
        assert not c_dst[:, 8:].view(torch.uint8).any()  # nothing written after the stop


async def test_an_l1_tier_keeps_the_pooled_path() -> None:
    backend = _Lender()
    src = _big_caches(8)
    dst = [torch.zeros_like(c) for c in src]
    async with Store([backend], l1_capacity_bytes=64 << 20) as store:
        await store.put_blocks(_keys(2), src, list(range(16)), "vllm")
        assert backend.lent == [] and len(backend) == 2
        assert await store.get_blocks(_keys(2), dst, list(range(16)), "vllm") == 2
    assert all(torch.equal(a[:, :16], b[:, :16]) for a, b in zip(src, dst, strict=True))


async def test_a_backend_whose_reads_are_overridden_is_not_borrowed_from() -> None:
    class Counting(_Lender):
        reads = 0

        async def get_into(self, key: ObjectKey, out: Any) -> int | None:
            type(self).reads += 1
            return await super().get_into(key, out)

    backend = Counting()
    src = _big_caches(9)
    async with Store([backend]) as store:
        await store.put_blocks(_keys(2), src, list(range(16)), "vllm")
        assert backend.borrow(_keys(2)[0]) is None
        dst = [torch.zeros_like(c) for c in src]
        assert await store.get_blocks(_keys(2), dst, list(range(16)), "vllm") == 2
        assert Counting.reads == 2
