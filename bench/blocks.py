"""Block-copy throughput: gather/scatter of paged KV blocks against a contiguous ``copy_``.

Run ``python bench/blocks.py [--quick]``; prints one JSON object. Each case times
``gather_blocks`` and ``scatter_blocks`` of block ids **drawn at random** (engines hand out
blocks in any order) beside a ``torch`` ``copy_`` of the same number of contiguous bytes,
interleaved in one loop so that noise from neighbours hits all three alike, and reports
medians, GB/s and the ratio to ``copy_`` (target: >= 0.85). The cases: every layout (vllm,
flashinfer, mla, sglang) in fp16 and bf16, 64 blocks out of 512 (32 layers; MLA 61) and 256
out of 4096 (8 layers, so that the caches stay at about 2 GiB). ``cpu_path``
says which CPU path ran: ``"c"`` (``csrc/block_copy_cpu.c``) or ``"torch"`` (the fallback;
``FLEXKV_STORE_DISABLE_CPU_KERNEL=1`` forces it, for comparison). With CUDA it also times
device -> pinned host gathers and pinned host -> device scatters beside a contiguous pinned
``copy_``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flexkv_store.transfer import chunk_shape, gather_blocks, kernel_available, scatter_blocks
from flexkv_store.transfer._cpu import cpu_path, cpu_path_note

TARGET_RATIO = 0.85


@dataclass(frozen=True)
class Case:
    name: str
    layout: str
    dtype: torch.dtype
    num_layers: int
    cache_blocks: int
    chunk_blocks: int
    block_size: int = 16
    num_kv_heads: int = 8
    head_size: int = 128


def _layer_shape(case: Case) -> tuple[int, ...]:
    nb, bs, h, d = case.cache_blocks, case.block_size, case.num_kv_heads, case.head_size
    if case.layout == "vllm":
        return (2, nb, bs, h, d)
    if case.layout == "flashinfer":
        return (nb, 2, bs, h, d)
    if case.layout == "mla":
        return (nb, bs, d)
    if case.layout == "sglang":
        return (nb * bs, h, d)
    raise ValueError(f"layout: the benchmark has no case for {case.layout!r}")


def _make_caches(case: Case, device: torch.device, *, one_allocation: bool) -> list[torch.Tensor]:
    """Per-layer caches: separate tensors (as vLLM allocates them), or views of one tensor."""
    # Filled (not empty) so that every page is mapped before timing; values do not matter.
    per_layer = 2 if case.layout == "sglang" else 1
    n = case.num_layers * per_layer
    if one_allocation:
        whole = torch.ones((n, *_layer_shape(case)), dtype=case.dtype, device=device)
        tensors = list(whole.unbind(0))
    else:
        tensors = [
            torch.ones(_layer_shape(case), dtype=case.dtype, device=device) for _ in range(n)
        ]
    if case.layout == "sglang":
        return [(tensors[2 * i], tensors[2 * i + 1]) for i in range(case.num_layers)]  # type: ignore[misc]
    return tensors


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def _interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin ``reps`` times after one warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _cpu_case(case: Case, reps: int, rng: random.Random) -> dict[str, Any]:
    cpu = torch.device("cpu")
    caches = _make_caches(case, cpu, one_allocation=False)
    shared = _make_caches(case, cpu, one_allocation=True)
    ids = rng.sample(range(case.cache_blocks), case.chunk_blocks)
    bs = case.block_size if case.layout == "sglang" else None
    chunk = torch.empty(chunk_shape(caches, len(ids), case.layout, block_size=bs), dtype=case.dtype)
    nbytes = chunk.numel() * chunk.element_size()
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    medians = _interleaved(
        {
            "copy": lambda: dst.copy_(src),
            "gather": lambda: gather_blocks(caches, ids, chunk, case.layout, block_size=bs),
            "scatter": lambda: scatter_blocks(chunk, caches, ids, case.layout, block_size=bs),
            "gather_one": lambda: gather_blocks(shared, ids, chunk, case.layout, block_size=bs),
            "scatter_one": lambda: scatter_blocks(chunk, shared, ids, case.layout, block_size=bs),
        },
        reps,
    )
    copy_gbps = _gbps(nbytes, medians["copy"])
    figures = {name: _gbps(nbytes, seconds) for name, seconds in medians.items()}
    return {
        "case": case.name,
        "layout": case.layout,
        "dtype": str(case.dtype).removeprefix("torch."),
        "num_layers": case.num_layers,
        "block_size": case.block_size,
        "num_kv_heads": case.num_kv_heads,
        "head_size": case.head_size,
        "chunk_blocks": case.chunk_blocks,
        "cache_blocks": case.cache_blocks,
        "block_ids": "random",
        "chunk_bytes": nbytes,
        "copy_gbps": copy_gbps,
        # Layers as separate tensors (the torch fallback: one op per plane).
        "gather_gbps": figures["gather"],
        "scatter_gbps": figures["scatter"],
        "gather_ratio": round(figures["gather"] / copy_gbps, 3),
        "scatter_ratio": round(figures["scatter"] / copy_gbps, 3),
        # Layers as views of one allocation (the torch fallback: one op for all layers).
        "one_allocation_gather_gbps": figures["gather_one"],
        "one_allocation_scatter_gbps": figures["scatter_one"],
        "one_allocation_gather_ratio": round(figures["gather_one"] / copy_gbps, 3),
        "one_allocation_scatter_ratio": round(figures["scatter_one"] / copy_gbps, 3),
    }


def _cuda_case(case: Case, reps: int, rng: random.Random) -> dict[str, Any]:
    dev = torch.device("cuda")
    caches = _make_caches(case, dev, one_allocation=False)
    ids = rng.sample(range(case.cache_blocks), case.chunk_blocks)
    bs = case.block_size if case.layout == "sglang" else None
    shape = chunk_shape(caches, len(ids), case.layout, block_size=bs)
    host = torch.empty(shape, dtype=case.dtype, pin_memory=True)
    nbytes = host.numel() * host.element_size()
    dev_flat = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    host_flat = host.view(-1).view(torch.uint8)

    def synced(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            torch.cuda.synchronize()

        return run

    medians = _interleaved(
        {
            "d2h_copy": synced(lambda: host_flat.copy_(dev_flat, non_blocking=True)),
            "gather_d2h": synced(
                lambda: gather_blocks(caches, ids, host, case.layout, block_size=bs)
            ),
            "h2d_copy": synced(lambda: dev_flat.copy_(host_flat, non_blocking=True)),
            "scatter_h2d": synced(
                lambda: scatter_blocks(host, caches, ids, case.layout, block_size=bs)
            ),
        },
        reps,
    )
    d2h = _gbps(nbytes, medians["d2h_copy"])
    h2d = _gbps(nbytes, medians["h2d_copy"])
    gather = _gbps(nbytes, medians["gather_d2h"])
    scatter = _gbps(nbytes, medians["scatter_h2d"])
    return {
        "case": case.name,
        "layout": case.layout,
        "dtype": str(case.dtype).removeprefix("torch."),
        "chunk_blocks": case.chunk_blocks,
        "chunk_bytes": nbytes,
        "d2h_copy_gbps": d2h,
        "gather_d2h_gbps": gather,
        "gather_ratio": round(gather / d2h, 3),
        "h2d_copy_gbps": h2d,
        "scatter_h2d_gbps": scatter,
        "scatter_ratio": round(scatter / h2d, 3),
    }


def _cases(quick: bool) -> list[Case]:
    """Random ids: 64 of 512 (32 layers, MLA 61) and 256 of 4096 (8 layers), every layout."""
    sizes = [(512, 64, None)] + ([] if quick else [(4096, 256, 8)])
    out = []
    for cache_blocks, chunk_blocks, layers in sizes:
        for layout in ("vllm", "flashinfer", "mla", "sglang"):
            for dtype in (torch.float16, torch.bfloat16):
                mla = layout == "mla"
                n = layers or (61 if mla else 32)
                out.append(
                    Case(
                        f"{layout}-{str(dtype).removeprefix('torch.')}-{n}L-"
                        f"{chunk_blocks}of{cache_blocks}",
                        layout,
                        dtype,
                        n,
                        cache_blocks,
                        chunk_blocks,
                        16,
                        1 if mla else 8,
                        576 if mla else 128,
                    )
                )
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its figures (``python bench/blocks.py`` prints them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller cases")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 11)
    rng = random.Random(0)
    cases = _cases(args.quick)
    cpu_results = [_cpu_case(case, reps, rng) for case in cases]
    result: dict[str, Any] = {
        "benchmark": "blocks",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_path": cpu_path(),
        "cpu_path_note": cpu_path_note(),
        "reps": reps,
        "target_ratio": TARGET_RATIO,
        "cpu": cpu_results,
        "cpu_meets_target": {
            layers: all(
                r[f"{prefix}gather_ratio"] >= TARGET_RATIO
                and r[f"{prefix}scatter_ratio"] >= TARGET_RATIO
                for r in cpu_results
            )
            for layers, prefix in (("separate", ""), ("one_allocation", "one_allocation_"))
        },
        "cuda": None,
    }
    if torch.cuda.is_available():
        result["cuda"] = {
            "device": torch.cuda.get_device_name(),
            "kernel": kernel_available(),
            "cases": [_cuda_case(case, reps, rng) for case in cases],
        }
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
