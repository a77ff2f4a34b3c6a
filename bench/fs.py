"""fs adapter bandwidth against fio on the same directory, alternated in one run.

Baseline (the device, what users compare with): fio writing and reading **one file**
(``--rw=write|read --bs=4M --direct=1 --ioengine=io_uring --iodepth=16``, the same total
volume, the same directory). A second fio baseline writes one file per object, which pays
the per-file costs the adapter pays too (open, create, rename); it shows how much of a gap
is the one-file-per-object layout itself.

For 4 MiB and 32 MiB objects the fs adapter (O_DIRECT, io_uring and threads engines) writes
the volume with ``put_many``, reads it with ``get_many`` and with ``get_into`` into aligned
buffers (batches of 32). fio and the adapter take turns ``--reps`` times (at least 5, after
one unrecorded warm-up turn); each
adapter figure is reported as GB/s (median) and as the median of its per-turn ratios to the
one-file fio of the same turn (target >= 0.9), so a noisy neighbour hits both alike.

Usage: python bench/fs.py [--quick] [--reps N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import emit, machine
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends.config import FsConfig
from flexkv_store.keyformat import ObjectKey

MIB = 1 << 20
BATCH = 32
ENGINES: list[tuple[str, Literal["io_uring", "threads"], bool]] = [
    ("io_uring_direct", "io_uring", True),
    ("threads_direct", "threads", True),
]
TARGET_RATIO = 0.9


def _fio_run(args: list[str], field: str) -> float:
    proc = subprocess.run(
        ["fio", "--output-format=json", *args], capture_output=True, text=True, check=True
    )
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0][field]
    return round(float(job["bw_bytes"]) / 1e9, 3)


def _fio(directory: Path, obj: int, total: int, *, one_file: bool) -> dict[str, float]:
    """fio write then read of ``total`` bytes, O_DIRECT, io_uring, QD 16: one file of the
    whole volume in 4 MiB blocks, or ``total // obj`` files of ``obj`` bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    common = [
        f"--directory={directory}",
        "--ioengine=io_uring",
        "--direct=1",
        "--iodepth=16",
        f"--size={total}",
        "--numjobs=1",
        "--group_reporting",
    ]
    if one_file:
        common += ["--bs=4M", "--filename=one-file"]
    else:
        common += [f"--bs={obj}", f"--filesize={obj}", f"--nrfiles={total // obj}",
                   "--filename_format=obj.$filenum"]  # fmt: skip
    out = {
        f"{rw}_gbps": _fio_run([*common, f"--name=fs-{rw}", f"--rw={rw}"], rw)
        for rw in ("write", "read")
    }
    shutil.rmtree(directory, ignore_errors=True)
    return out


def _aligned(n: int) -> np.ndarray:
    raw = np.empty(n + 4096, dtype=np.uint8)
    start = -raw.ctypes.data % 4096
    return raw[start : start + n]


async def _adapter(
    directory: Path, engine: Literal["io_uring", "threads"], direct: bool, obj: int, total: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    count = total // obj
    keys = [ObjectKey("bench/fs", 0, i.to_bytes(4, "big")) for i in range(count)]
    # A few distinct aligned source buffers, cycled: the adapter checksums every payload, so
    # identical contents would not make anything cheaper.
    rng = np.random.default_rng(0)
    sources = [_aligned(obj) for _ in range(4)]
    for s in sources:
        s[:] = rng.integers(0, 256, obj, dtype=np.uint8)
    config = FsConfig(
        path=str(directory), io_engine=engine, direct_io=direct, queue_depth=16, threads=8
    )
    async with FsAdapter(config) as a:
        info = a.info()
        start = time.perf_counter()
        for i in range(0, count, BATCH):
            await a.put_many(
                (keys[j], sources[j % len(sources)]) for j in range(i, min(i + BATCH, count))
            )
        t_write = time.perf_counter() - start
        start = time.perf_counter()
        got = 0
        for i in range(0, count, BATCH):
            for data in await a.get_many(keys[i : i + BATCH]):
                assert data is not None and len(data) == obj
                got += len(data)
        t_read = time.perf_counter() - start
        # get_into straight into aligned caller memory: no bytes object, no extra copy. An
        # engine reads into buffers it keeps, so they are touched before the clock starts
        # (a VM's first touch of fresh pages would be measured, not the read path).
        outs = [_aligned(obj) for _ in range(min(BATCH, count))]
        for o in outs:
            o.fill(0)
        start = time.perf_counter()
        for i in range(0, count, BATCH):
            n = await asyncio.gather(
                *(a.get_into(k, o) for k, o in zip(keys[i : i + BATCH], outs, strict=False))
            )
            assert all(x == obj for x in n)
        t_into = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "write_gbps": round(total / t_write / 1e9, 3),
        "read_gbps": round(got / t_read / 1e9, 3),
        "get_into_gbps": round(total / t_into / 1e9, 3),
    }, info


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def _pair_ratio(runs: list[dict[str, Any]], base: list[dict[str, float]], k: str, b: str) -> float:
    """Median over turns of the adapter's figure over the same turn's baseline."""
    return round(float(statistics.median(r[k] / f[b] for r, f in zip(runs, base, strict=True))), 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and return (and print) its JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB per case instead of 1 GiB")
    parser.add_argument("--reps", type=int, default=5, help="turns of fio and the adapter (>= 5)")
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to test")
    args = parser.parse_args(argv)
    if shutil.which("fio") is None:
        raise SystemExit("bench/fs.py needs fio (apt-get install fio)")
    total = (256 if args.quick else 1024) * MIB
    reps = max(5, args.reps)
    base = Path(tempfile.mkdtemp(prefix="flexkv-fs-bench-", dir=args.dir))
    result: dict[str, Any] = {
        "bench": "fs",
        "dir": str(base.parent),
        "quick": args.quick,
        "machine": machine(),
        "baseline": "fio one file: --rw=write|read --bs=4M --direct=1 --ioengine=io_uring "
        "--iodepth=16, same directory and volume",
        "second_baseline": "fio one file per object (same flags, bs = object size)",
        "figures": "GB/s medians; ratios: median of per-turn ratios to the one-file fio",
        "reps": reps,
        "target_ratio": TARGET_RATIO,
        "cases": {},
    }
    try:
        for label, obj in (("4MiB", 4 * MIB), ("32MiB", 32 * MIB)):
            one: list[dict[str, float]] = []
            per_file: list[dict[str, float]] = []
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in ENGINES}
            engines: dict[str, str] = {}
            for turn in range(reps + 1):
                # Turn 0 warms up (and is not recorded): a VM's first touch of memory it
                # never used costs host page faults that a running engine does not pay.
                f1 = _fio(base / "fio1", obj, total, one_file=True)
                fn = _fio(base / "fion", obj, total, one_file=False)
                if turn:
                    one.append(f1)
                    per_file.append(fn)
                for name, engine, direct in ENGINES:
                    figures, info = asyncio.run(_adapter(base / name, engine, direct, obj, total))
                    if turn:
                        runs[name].append(figures)
                    engines[name] = info["io_engine"]
            case: dict[str, Any] = {
                "object_bytes": obj,
                "total_bytes": total,
                "fio_one_file": _median(one),
                "fio_file_per_object": _median(per_file),
            }
            for name, _, _ in ENGINES:
                figures = _median(runs[name])
                for k, b in (("write_gbps", "write_gbps"), ("read_gbps", "read_gbps"),
                             ("get_into_gbps", "read_gbps")):  # fmt: skip
                    what = k.removesuffix("_gbps")
                    figures[f"{what}_ratio_vs_fio_one_file"] = _pair_ratio(runs[name], one, k, b)
                    figures[f"{what}_ratio_vs_fio_file_per_object"] = _pair_ratio(
                        runs[name], per_file, k, b
                    )
                figures["meets_target"] = all(
                    figures[f"{w}_ratio_vs_fio_one_file"] >= TARGET_RATIO
                    for w in ("write", "read", "get_into")
                )
                figures["engine"] = engines[name]
                case[name] = figures
            result["cases"][label] = case
    finally:
        shutil.rmtree(base, ignore_errors=True)
    emit(result)
    return result


if __name__ == "__main__":
    main()
