"""``Store.put_blocks`` / ``Store.get_blocks`` throughput, and the event loop's longest stall.

Workload: vLLM layout, 32 layers, fp16, 8 KV heads of 128, blocks of 16 tokens; 16 chunks
of 16 blocks each (32 MiB per chunk, 512 MiB in all), the block ids drawn at random from a
cache of 512 blocks.

- memory backend: ``put_blocks`` and ``get_blocks`` beside a contiguous ``copy_`` of the
  same 512 MiB (target >= 0.8x);
- fs backend (O_DIRECT, io_uring): beside the same run's fs ``put_many`` / ``get_into`` of
  16 ready 32 MiB buffers, i.e. the I/O alone (target >= 0.9x);
- a probe task sleeps 1 ms at a time during each ``put_blocks`` / ``get_blocks`` and
  records how late it woke: the longest event-loop stall (target < 2 ms). (epoll counts in
  whole milliseconds, so a shorter sleep waits 1 ms anyway and would count the rest as
  stall.) Beside it, in the same turn, the same probe on the idle loop for as long (what
  this machine gives a loop that does nothing), on fs during the ready-buffer I/O, and in
  another process (a plain Python loop of 1 ms sleeps, sharing no GIL with the store)
  during a repeat of the turn's ``put_blocks`` / ``get_blocks``: what the machine itself
  gives any thread then. (That probe runs only in the repeats, untimed, so that its 1000
  wake-ups a second never compete with the measured calls for this machine's few cores.)

Each figure is a median over ``--reps`` turns taken in alternation with its baseline, and
each ratio the median of the per-turn ratios. Usage: python bench/store_blocks.py [--reps N]
[--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
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
PROBE_S = 0.001


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


# Another process's probe: while told "go", sleeps 1 ms at a time and records each
# wake-up's time (CLOCK_MONOTONIC, as perf_counter here) and lateness; "pause" stops it
# (no wake-ups at all), "stop" ends it and prints what it recorded. Each command is
# acknowledged with a line.
_SLEEPER = """
import json, os, select, sys, time

def command():
    line = b""
    while not line.endswith(b"\\n"):
        c = os.read(0, 1)
        if not c:
            return "stop"
        line += c
    return line.decode().strip()

woke = []
print("ready", flush=True)
cmd = command()
while cmd == "go":
    print("going", flush=True)
    while not select.select([0], [], [], 0)[0]:
        t = time.perf_counter()
        time.sleep(0.001)
        now = time.perf_counter()
        woke.append((now, now - t - 0.001))
    cmd = command()
    if cmd == "pause":
        print("paused", flush=True)
        cmd = command()
json.dump(woke, sys.stdout)
"""


class OtherProcess:
    """The same 1 ms probe in another process, for the windows :meth:`window` records.

    It runs only between :meth:`go` and :meth:`pause`, so that its wake-ups (1000 a
    second, on this machine's few cores) never slow the measured turns down.
    """

    def __init__(self) -> None:
        self.windows: list[tuple[str, float, float]] = []
        self.woke: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> OtherProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SLEEPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect("ready")
        return self

    def _say(self, cmd: str, ack: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(cmd + "\n")
        self._proc.stdin.flush()
        self._expect(ack)

    def _expect(self, ack: str) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if line != ack:
            raise RuntimeError(f"the other-process probe said {line!r}, not {ack!r}")

    def go(self) -> None:
        self._say("go", "going")

    def pause(self) -> None:
        self._say("pause", "paused")

    def window(self, label: str, start: float, end: float) -> None:
        self.windows.append((label, start, end))

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        try:
            out, _ = self._proc.communicate("stop\n", timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            self._proc.kill()
            if exc[0] is None:  # else keep the run's own error
                raise
            return
        if exc[0] is None:
            self.woke = json.loads(out)

    def worst(self, label: str) -> list[float]:
        """Per window of ``label``, the longest lateness of a sleep that overlaps it (a
        wake-up at ``now`` that was ``late`` late slept from ``now - late - 1 ms``)."""
        return [
            max(
                (late for now, late in self.woke if now >= start and now - late - PROBE_S <= end),
                default=0.0,
            )
            for lab, start, end in self.windows
            if lab == label
        ]


#: Set by main: the other-process probe.
_other: OtherProcess | None = None


async def _timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Seconds of ``fn`` and the longest loop stall while it ran."""
    async with Probe() as probe:
        start = time.perf_counter()
        await fn()
        end = time.perf_counter()
    return end - start, probe.worst


async def _beside_other(label: str, fn: Callable[[], Awaitable[Any]]) -> None:
    """Run ``fn`` (untimed) with the other process's probe on, as window ``label``."""
    assert _other is not None
    _other.go()
    start = time.perf_counter()
    try:
        await fn()
    finally:
        end = time.perf_counter()
        _other.pause()
    _other.window(label, start, end)


async def _idle(seconds: float) -> float:
    """The longest stall of the idle loop over ``seconds``."""
    return (await _timed(lambda: asyncio.sleep(seconds)))[1]


#: A baseline turn: seconds of its put and get, and the longest stalls during them (None
#: where the baseline runs on the loop itself).
Turn = tuple[float, float, float | None, float | None]


async def _case(
    store: Store,
    caches: list[torch.Tensor],
    ids: list[int],
    salt: str,
    baseline: Callable[[int], Awaitable[Turn]],
    reps: int,
    name: str,
) -> dict[str, Any]:
    nbytes = CHUNKS * PER_CHUNK * 2 * LAYERS * BS * HEADS * HEAD * 2
    out = [torch.zeros_like(c) for c in caches]
    put_t: list[float] = []
    get_t: list[float] = []
    base_put: list[float] = []
    base_get: list[float] = []
    stalls: list[float] = []
    idle: list[float] = []
    base_stalls: list[float] = []
    for r in range(reps + 1):  # the first turn warms the pool and the caches up
        keys = [ObjectKey("bench/blocks", r, i.to_bytes(2, "big"), salt) for i in range(CHUNKS)]
        tp, sp = await _timed(lambda k=keys: store.put_blocks(k, caches, ids, "vllm"))  # type: ignore[misc]
        tg, sg = await _timed(lambda k=keys: store.get_blocks(k, out, ids, "vllm"))  # type: ignore[misc]
        ip, ig = await _idle(tp), await _idle(tg)
        bp, bg, bsp, bsg = await baseline(r)
        await store.delete_many(keys)
        if r:  # the same calls again, untimed, with the other process's probe on
            await _beside_other(name, lambda k=keys: store.put_blocks(k, caches, ids, "vllm"))  # type: ignore[misc]
            await _beside_other(name, lambda k=keys: store.get_blocks(k, out, ids, "vllm"))  # type: ignore[misc]
            await store.delete_many(keys)
        if r:
            put_t.append(tp)
            get_t.append(tg)
            base_put.append(bp)
            base_get.append(bg)
            stalls += [sp, sg]
            idle += [ip, ig]
            base_stalls += [x for x in (bsp, bsg) if x is not None]
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
        "idle_longest_loop_stall_ms": round(max(idle) * 1e3, 3),
        "idle_median_loop_stall_ms": round(statistics.median(idle) * 1e3, 3),
        **(
            {
                "baseline_longest_loop_stall_ms": round(max(base_stalls) * 1e3, 3),
                "baseline_median_loop_stall_ms": round(statistics.median(base_stalls) * 1e3, 3),
            }
            if base_stalls
            else {}
        ),
    }


async def _run(reps: int, directory: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    caches = [torch.randn((2, BLOCKS, BS, HEADS, HEAD), dtype=torch.float16) for _ in range(LAYERS)]
    ids = random.Random(0).sample(range(BLOCKS), CHUNKS * PER_CHUNK)
    chunk = 2 * LAYERS * PER_CHUNK * BS * HEADS * HEAD * 2
    src = torch.ones(CHUNKS * chunk, dtype=torch.uint8)
    dst = torch.zeros_like(src)

    async def copy_baseline(_: int) -> Turn:
        # The same bytes as one contiguous copy_ (each way), on the loop's thread.
        t = time.perf_counter()
        dst.copy_(src)
        one = time.perf_counter() - t
        return one, one, None, None

    result: dict[str, Any] = {}
    async with Store([MemoryAdapter()]) as store:
        result["memory"] = await _case(store, caches, ids, "", copy_baseline, reps, "memory")
    result["memory"]["baseline"] = "torch copy_ of the same bytes, contiguous"

    fs_cfg = FsConfig(path=str(directory), io_engine="auto", direct_io=True, queue_depth=16)
    # Page-aligned, as the store's pooled chunk buffers are: O_DIRECT without a bounce.
    ready = [_aligned(chunk, False).fill_(1) for _ in range(CHUNKS)]
    async with Store([FsAdapter(fs_cfg)]) as store:
        backend = store.backends[0]

        async def io_baseline(r: int) -> Turn:
            keys = [ObjectKey("bench/ready", r, i.to_bytes(2, "big")) for i in range(CHUNKS)]
            tp, sp = await _timed(lambda: backend.put_many(list(zip(keys, ready, strict=True))))
            tg, sg = await _timed(
                lambda: asyncio.gather(
                    *(backend.get_into(k, b) for k, b in zip(keys, ready, strict=True))
                )
            )
            await backend.delete_many(keys)
            return tp, tg, sp, sg

        result["fs"] = await _case(store, caches, ids, "", io_baseline, reps, "fs")
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
        global _other
        with OtherProcess() as _other:
            cases = asyncio.run(_run(reps, base))
        for name, case in cases.items():
            worst = _other.worst(name)
            case["other_process_longest_stall_ms"] = round(max(worst) * 1e3, 3)
            case["other_process_median_stall_ms"] = round(statistics.median(worst) * 1e3, 3)
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
