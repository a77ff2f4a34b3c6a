"""fs adapter bandwidth against fio on the same directory, in one run.

For 4 MiB and 256 KiB objects: fio (``--direct=1 --ioengine=io_uring --iodepth=16``, one
file per object, same object size and total, a write job then a read job) is the baseline;
the fs adapter writes the same volume with ``put_many`` and reads it back with ``get_many``
(batches of 32), with the io_uring and the threads engine, O_DIRECT on and off. Figures
are GB/s (10^9 bytes per second) and each adapter figure has its ratio to fio's.

Reads with O_DIRECT come from the device. Buffered runs (``direct_io`` off) write into and
read from the page cache (nothing can drop it without root), so they measure memory
copies, not the disk: they are reported, not compared.

Usage: python bench/fs.py [--quick] [--dir DIR]
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

from bench._util import emit, machine, ratio
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends.config import FsConfig
from flexkv_store.keyformat import ObjectKey

MIB = 1 << 20
BATCH = 32
ENGINES: list[tuple[str, Literal["io_uring", "threads"], bool]] = [
    ("io_uring_direct", "io_uring", True),
    ("threads_direct", "threads", True),
    ("io_uring_buffered", "io_uring", False),
    ("threads_buffered", "threads", False),
]


def _fio(directory: Path, obj: int, total: int) -> dict[str, float]:
    """fio write then read of ``total // obj`` files of ``obj`` bytes, O_DIRECT, QD 16."""
    directory.mkdir(parents=True, exist_ok=True)
    common = [
        "fio",
        "--output-format=json",
        f"--directory={directory}",
        "--ioengine=io_uring",
        "--direct=1",
        "--iodepth=16",
        f"--bs={obj}",
        f"--filesize={obj}",
        f"--nrfiles={total // obj}",
        f"--size={total}",
        "--numjobs=1",
        "--group_reporting",
    ]
    out: dict[str, float] = {}
    for rw, field in (("write", "write"), ("read", "read")):
        proc = subprocess.run(
            [*common, f"--name=fs-{rw}", "--filename_format=obj.$filenum", f"--rw={rw}"],
            capture_output=True,
            text=True,
            check=True,
        )
        job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0][field]
        out[f"{rw}_gbps"] = round(job["bw_bytes"] / 1e9, 3)
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
        # get_into straight into aligned caller memory: no bytes object, no extra copy.
        outs = [_aligned(obj) for _ in range(BATCH)]
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and return (and print) its JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB per case instead of 1 GiB")
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to test")
    args = parser.parse_args(argv)
    if shutil.which("fio") is None:
        raise SystemExit("bench/fs.py needs fio (apt-get install fio)")
    total_big = (256 if args.quick else 1024) * MIB
    total_small = (128 if args.quick else 512) * MIB
    base = Path(tempfile.mkdtemp(prefix="flexkv-fs-bench-", dir=args.dir))
    result: dict[str, Any] = {
        "bench": "fs",
        "dir": str(base.parent),
        "quick": args.quick,
        "machine": machine(),
        "baseline": "fio --direct=1 --ioengine=io_uring --iodepth=16, one file per object",
        "figures": "GB/s, median of runs taken in turn with fio",
        "cases": {},
    }
    reps = 2 if args.quick else 3
    try:
        for label, obj, total in (("4MiB", 4 * MIB, total_big), ("256KiB", 256 << 10, total_small)):
            # The disk is shared: fio and the adapter take turns, each run `reps` times, and
            # the medians are compared, so a noisy neighbour hits both sides alike.
            fio_runs: list[dict[str, float]] = []
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in ENGINES}
            engines: dict[str, str] = {}
            for _ in range(reps):
                fio_runs.append(_fio(base / "fio", obj, total))
                for name, engine, direct in ENGINES:
                    figures, info = asyncio.run(_adapter(base / name, engine, direct, obj, total))
                    runs[name].append(figures)
                    engines[name] = info["io_engine"]
            fio = _median(fio_runs)
            case: dict[str, Any] = {"object_bytes": obj, "total_bytes": total, "fio": fio}
            for name, _, direct in ENGINES:
                figures = _median(runs[name])
                if direct:
                    figures["write_ratio_vs_fio"] = ratio(figures["write_gbps"], fio["write_gbps"])
                    figures["read_ratio_vs_fio"] = ratio(figures["read_gbps"], fio["read_gbps"])
                    figures["get_into_ratio_vs_fio"] = ratio(
                        figures["get_into_gbps"], fio["read_gbps"]
                    )
                else:
                    figures["note"] = "page cache: not comparable with fio"
                figures["engine"] = engines[name]
                case[name] = figures
            result["cases"][label] = case
    finally:
        shutil.rmtree(base, ignore_errors=True)
    emit(result)
    return result


if __name__ == "__main__":
    main()
