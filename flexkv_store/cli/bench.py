"""``flexkv-store bench``: put/get throughput of the configured backends."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from flexkv_store.cli._common import (
    EXIT_OK,
    MIB,
    AddCommand,
    CliError,
    console,
    emit_json,
    human,
    store_config,
)

__all__ = ["register"]


def register(add: AddCommand) -> None:
    """Add the bench subcommand(s)."""
    p = add("bench", "measure put/get throughput of a backend",
            "flexkv-store bench --backend redis://127.0.0.1:6379/0 --size-mib 4")  # fmt: skip
    p.add_argument("--size-mib", type=float, default=4.0, help="object size in MiB (default 4)")
    p.add_argument("--count", type=int, default=64, help="objects per round (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    p.set_defaults(func=cmd_bench)


async def _bench_adapter(acfg: Any, size: int, count: int, rounds: int) -> dict[str, Any]:
    import statistics

    import numpy as np

    from flexkv_store.backends import open_adapter
    from flexkv_store.keyformat import ObjectKey

    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    puts, gets = [], []
    async with open_adapter(acfg) as adapter:
        for r in range(rounds):
            keys = [ObjectKey("flexkv-bench", r, os.urandom(16), "bench") for _ in range(count)]
            t0 = time.perf_counter()
            await adapter.put_many([(k, payload) for k in keys])
            puts.append(size * count / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            got = await adapter.get_many(keys)
            gets.append(size * count / (time.perf_counter() - t0))
            if any(g is None or len(g) != size for g in got):
                raise CliError("bench: an object read back wrong", 1)
            await adapter.delete_many(keys)
        info = adapter.info()
    return {
        "backend": acfg.type,
        "object_bytes": size,
        "objects": count,
        "put_gb_s": round(statistics.median(puts) / 1e9, 3),
        "get_gb_s": round(statistics.median(gets) / 1e9, 3),
        "info": info,
    }


def cmd_bench(args: argparse.Namespace) -> int:

    cfg = store_config(args)
    size = int(args.size_mib * MIB)
    results = [asyncio.run(_bench_adapter(a, size, args.count, args.rounds)) for a in cfg.adapters]
    if args.json:
        emit_json(results)
        return EXIT_OK
    from rich.table import Table

    table = Table(title=f"{args.count} x {human(size)} objects, median of {args.rounds}")
    for col in ("backend", "put GB/s", "get GB/s", "engine"):
        table.add_column(col)
    for r in results:
        table.add_row(r["backend"], f"{r['put_gb_s']:.3f}", f"{r['get_gb_s']:.3f}",
                      str(r["info"].get("io_engine", "-")))  # fmt: skip
    console().print(table)
    return EXIT_OK
