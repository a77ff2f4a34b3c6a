"""``Store.put_blocks`` / ``Store.get_blocks`` throughput, and the event loop's longest stall.

Workload: vLLM layout, 32 layers, fp16, 8 KV heads of 128, blocks of 16 tokens; 16 chunks
of 16 blocks each (32 MiB per chunk, 512 MiB in all), the block ids drawn at random from a
cache of 512 blocks.

- memory backend: ``put_blocks`` and ``get_blocks`` beside a contiguous ``copy_`` of the
  same 512 MiB (target >= 0.8x);
- fs backend (O_DIRECT, io_uring): beside the same run's fs ``put_many`` / ``get_into`` of
  16 ready 32 MiB buffers, i.e. the I/O alone (target >= 0.9x);
- a probe task wakes every 0.5 ms during each ``put_blocks`` / ``get_blocks`` and records
  how late it woke: the longest event-loop stall (target < 2 ms).

Each figure is a median over ``--reps`` turns taken in alternation with its baseline, and
each ratio the median of the per-turn ratios. Usage: python bench/store_blocks.py [--reps N]
[--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import emit, machine
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends._memory import MemoryAdapter
from flexkv_store.backends.config import FsConfig
from flexkv_store.keyformat import ObjectKey
from flexkv_store.store import Store
from flexkv_store.transfer._pool import _aligned

LAYERS, BLOCKS, BS, HEADS, HEAD = 32, 512, 16, 8, 128
CHUNKS, PER_CHUNK = 16, 16
PROBE_S = 0.0005


class Probe:
    """Wakes every PROBE_S and keeps the largest lateness (the loop's longest stall)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(PROBE_S)
            self.worst = max(self.worst, time.perf_counter() - t - PROBE_S)

    async def __aenter__(self) -> Probe:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Seconds of ``fn`` and the longest loop stall while it ran."""
    async with Probe() as probe:
        start = time.perf_counter()
        await fn()
        elapsed = time.perf_counter() - start
    return elapsed, probe.worst


async def _case(
    store: Store,
    caches: list[torch.Tensor],
    ids: list[int],
    salt: str,
    baseline: Callable[[int], Awaitable[tuple[float, float]]],
    reps: int,
) -> dict[str, Any]:
    nbytes = CHUNKS * PER_CHUNK * 2 * LAYERS * BS * HEADS * HEAD * 2
    out = [torch.zeros_like(c) for c in caches]
    put_t: list[float] = []
    get_t: list[float] = []
    base_put: list[float] = []
    base_get: list[float] = []
    stalls: list[float] = []
    for r in range(reps + 1):  # the first turn warms the pool and the caches up
        keys = [ObjectKey("bench/blocks", r, i.to_bytes(2, "big"), salt) for i in range(CHUNKS)]
        tp, sp = await _timed(lambda k=keys: store.put_blocks(k, caches, ids, "vllm"))  # type: ignore[misc]
        tg, sg = await _timed(lambda k=keys: store.get_blocks(k, out, ids, "vllm"))  # type: ignore[misc]
        bp, bg = await baseline(r)
        await store.delete_many(keys)
        if r:
            put_t.append(tp)
            get_t.append(tg)
            base_put.append(bp)
            base_get.append(bg)
            stalls += [sp, sg]
    gb = nbytes / 1e9
    return {
        "bytes": nbytes,
        "put_blocks_gbps": round(gb / statistics.median(put_t), 3),
        "get_blocks_gbps": round(gb / statistics.median(get_t), 3),
        "baseline_put_gbps": round(gb / statistics.median(base_put), 3),
        "baseline_get_gbps": round(gb / statistics.median(base_get), 3),
        "put_ratio": round(
            statistics.median(b / t for b, t in zip(base_put, put_t, strict=True)), 3
        ),
        "get_ratio": round(
            statistics.median(b / t for b, t in zip(base_get, get_t, strict=True)), 3
        ),
        "longest_loop_stall_ms": round(max(stalls) * 1e3, 3),
        "median_loop_stall_ms": round(statistics.median(stalls) * 1e3, 3),
    }


async def _run(reps: int, directory: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    caches = [torch.randn((2, BLOCKS, BS, HEADS, HEAD), dtype=torch.float16) for _ in range(LAYERS)]
    ids = random.Random(0).sample(range(BLOCKS), CHUNKS * PER_CHUNK)
    chunk = 2 * LAYERS * PER_CHUNK * BS * HEADS * HEAD * 2
    src = torch.ones(CHUNKS * chunk, dtype=torch.uint8)
    dst = torch.zeros_like(src)

    async def copy_baseline(_: int) -> tuple[float, float]:
        # The same bytes as one contiguous copy_ (each way).
        t = time.perf_counter()
        dst.copy_(src)
        one = time.perf_counter() - t
        return one, one

    result: dict[str, Any] = {}
    async with Store([MemoryAdapter()]) as store:
        result["memory"] = await _case(store, caches, ids, "", copy_baseline, reps)
    result["memory"]["baseline"] = "torch copy_ of the same bytes, contiguous"

    fs_cfg = FsConfig(path=str(directory), io_engine="auto", direct_io=True, queue_depth=16)
    # Page-aligned, as the store's pooled chunk buffers are: O_DIRECT without a bounce.
    ready = [_aligned(chunk, False).fill_(1) for _ in range(CHUNKS)]
    async with Store([FsAdapter(fs_cfg)]) as store:
        backend = store.backends[0]

        async def io_baseline(r: int) -> tuple[float, float]:
            keys = [ObjectKey("bench/ready", r, i.to_bytes(2, "big")) for i in range(CHUNKS)]
            t = time.perf_counter()
            await backend.put_many(list(zip(keys, ready, strict=True)))
            tp = time.perf_counter() - t
            t = time.perf_counter()
            await asyncio.gather(
                *(backend.get_into(k, b) for k, b in zip(keys, ready, strict=True))
            )
            tg = time.perf_counter() - t
            await backend.delete_many(keys)
            return tp, tg

        result["fs"] = await _case(store, caches, ids, "", io_baseline, reps)
        result["fs"]["engine"] = backend.info()["io_engine"]
    result["fs"]["baseline"] = "the fs adapter's put_many / get_into of 16 ready 32 MiB buffers"
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 turns instead of --reps")
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to test")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="flexkv-blocks-bench-", dir=args.dir))
    try:
        reps = 3 if args.quick else args.reps
        cases = asyncio.run(_run(reps, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "bench": "store_blocks",
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "workload": f"vllm fp16, {LAYERS} layers, {CHUNKS} chunks of {PER_CHUNK} blocks "
        f"(32 MiB), random ids of {BLOCKS}",
        "reps": 3 if args.quick else args.reps,
        "targets": {"memory_ratio": 0.8, "fs_ratio": 0.9, "longest_loop_stall_ms": 2.0},
        **cases,
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
