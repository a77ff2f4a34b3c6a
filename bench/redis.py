"""Redis adapter throughput against a plain redis-py loop and redis-benchmark, one server.

Starts its own redis-server on 127.0.0.1, then for 256 KiB and 4 MiB values measures:
  * the adapter: ``put``/``get`` one at a time, and ``put_many``/``get_many``;
  * plain redis-py asyncio (hiredis) on the same server with the same command shapes:
    SET/GET one at a time, and batches grouped exactly as the adapter groups them
    (``put_many``: pipelines of up to 4 MiB / 64 SETs, values above the adapter's
    ``pipeline_value_limit`` as single SETs; ``get_many``: MGET of 16 keys), one batch
    part in flight, storing the raw payloads (the adapter's header and checksum are part
    of what it costs);
  * redis-benchmark (the C client) with one connection, ``-P 1`` and ``-P 16``: the ceiling.
Every figure is GB/s of payload, median of runs. Adapter and plain runs alternate
(A B B A ...) so drift on a shared machine hits both alike; ``adapter_over_plain`` is the
median of the per-pair ratios (target >= 0.9), ``adapter_over_redis_benchmark`` the ratio
of medians.

Usage: python bench/redis.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    # This file is bench/redis.py: with bench/ first on sys.path, `import redis` would
    # import this script instead of redis-py.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aredis
from servers import RedisServer, start_redis

from bench._util import adapter_workloads, emit, machine, ratio
from flexkv_store.backends import RedisConfig
from flexkv_store.backends._redis import (
    _PIPELINE_BYTES,
    _PIPELINE_MAX_COMMANDS,
    _READ_GROUP,
    RedisAdapter,
)
from flexkv_store.keyformat import ObjectKey

KIB, MIB = 1 << 10, 1 << 20
PLAIN_PIPELINE = 16


async def _rate(fn: Callable[[], Awaitable[int]], repeat: int) -> float:
    """GB/s of ``fn`` (which returns the payload bytes it moved): median of ``repeat`` runs."""
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        n = await fn()
        rates.append(n / (time.perf_counter() - start) / 1e9)
    return round(statistics.median(rates), 3)


def _redis_benchmark(server: RedisServer, size: int, count: int, pipeline: int) -> dict[str, float]:
    """GB/s of SET and GET from redis-benchmark with one connection."""
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(server.port),
            "-t",
            "set,get",
            "-d",
            str(size),
            "-n",
            str(count),
            "-c",
            "1",
            "-P",
            str(pipeline),
            "--csv",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rates: dict[str, float] = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] in ("SET", "GET"):
            rates[cells[0].lower()] = round(float(cells[1]) * size / 1e9, 3)
    return rates


async def _measure(server: RedisServer, size: int, count: int, repeat: int) -> dict[str, Any]:
    payloads = [os.urandom(size) for _ in range(4)]
    total = size * count
    keys = [ObjectKey("bench/model", 0, i.to_bytes(8, "big")) for i in range(count)]
    names = [f"plain/{i}" for i in range(count)]
    adapter = RedisAdapter(RedisConfig(port=server.port, key_prefix="bench/"))
    plain = aredis.Redis(host="127.0.0.1", port=server.port, max_connections=32)

    ours = adapter_workloads(adapter, keys, payloads)
    a_put, a_get, a_put_many, a_get_many = (
        ours["put"], ours["get"], ours["put_many"], ours["get_many"]
    )  # fmt: skip

    async def p_put() -> int:
        for i, n in enumerate(names):
            await plain.set(n, payloads[i % 4])
        return total

    async def p_get() -> int:
        for n in names:
            await plain.get(n)
        return total

    # The adapter's batch shapes (see RedisAdapter.put_many / get_many), for raw values.
    limit = adapter.config.pipeline_value_limit
    if size > limit:
        put_groups = [[i] for i in range(count)]
    else:
        depth = max(1, min(_PIPELINE_MAX_COMMANDS, _PIPELINE_BYTES // size))
        put_groups = [list(range(s, min(s + depth, count))) for s in range(0, count, depth)]
    get_groups = [names[s : s + _READ_GROUP] for s in range(0, count, _READ_GROUP)]

    async def p_put_many() -> int:
        for g in put_groups:
            if len(g) == 1:
                await plain.set(names[g[0]], payloads[g[0] % 4])
                continue
            pipe = plain.pipeline(transaction=False)
            for i in g:
                pipe.set(names[i], payloads[i % 4])
            await pipe.execute()
        return total

    async def p_get_many() -> int:
        # Like get_many, hand back every value of the batch (all alive at once).
        out: list[Any] = []
        for g in get_groups:
            if len(g) == 1:
                out.append(await plain.get(g[0]))
            else:
                out.extend(await plain.mget(g))
        return total

    # Interleave adapter and plain runs so drift on a shared 2-core box hits both alike.
    pairs = {
        "put": (a_put, p_put),
        "get": (a_get, p_get),
        "put_many": (a_put_many, p_put_many),
        "get_many": (a_get_many, p_get_many),
    }
    result: dict[str, Any] = {}
    try:
        await a_put()
        await p_put()
        for op, (a_fn, p_fn) in pairs.items():
            await a_fn()  # warm up both (connections, allocator) before timing
            await p_fn()
            a_rates, p_rates = [], []
            for r in range(repeat):
                if r % 2 == 0:
                    a_rates.append(await _rate(a_fn, 1))
                    p_rates.append(await _rate(p_fn, 1))
                else:
                    p_rates.append(await _rate(p_fn, 1))
                    a_rates.append(await _rate(a_fn, 1))
            a_gbs, p_gbs = statistics.median(a_rates), statistics.median(p_rates)
            result[op] = {
                "adapter_gbs": round(a_gbs, 3),
                "plain_gbs": round(p_gbs, 3),
                "adapter_over_plain": round(
                    statistics.median(a / p for a, p in zip(a_rates, p_rates, strict=True)), 3
                ),
            }
        await plain.flushall()
    finally:
        await adapter.aclose()
        await plain.aclose()
    single = _redis_benchmark(server, size, max(count, 50), 1)
    piped = _redis_benchmark(server, size, max(count, 50), PLAIN_PIPELINE)
    for op, ceiling in (
        ("put", single["set"]),
        ("get", single["get"]),
        ("put_many", piped["set"]),
        ("get_many", piped["get"]),
    ):
        result[op]["redis_benchmark_gbs"] = ceiling
        result[op]["adapter_over_redis_benchmark"] = ratio(result[op]["adapter_gbs"], ceiling)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and prints) the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs")
    args = parser.parse_args(argv)
    repeat = 5 if args.quick else 9
    budget = (64 if args.quick else 256) * MIB  # payload bytes per timed run
    with tempfile.TemporaryDirectory(prefix="flexkv-bench-redis-") as tmp:
        server = start_redis(Path(tmp), unix_socket=False)
        try:
            results = {
                f"{size // KIB}KiB": asyncio.run(_measure(server, size, budget // size, repeat))
                for size in (256 * KIB, 4 * MIB)
            }
        finally:
            server.stop()
    out = {
        "benchmark": "redis",
        "machine": machine(),
        "notes": (
            "GB/s of payload, median of runs; one redis-server on 127.0.0.1 shared by all; "
            "plain = redis-py asyncio+hiredis, same commands and batch shapes as the adapter "
            f"(put_many: pipelines of <= {_PIPELINE_BYTES >> 20} MiB / "
            f"{_PIPELINE_MAX_COMMANDS} SETs, large values single; get_many: MGET of "
            f"{_READ_GROUP}), raw values; adapter and plain runs alternate, "
            "adapter_over_plain = median of per-pair ratios; "
            "redis_benchmark = C client, 1 connection, -P 1 (single) / -P 16 (batched)"
        ),
        "results": results,
    }
    emit(out)
    return out


if __name__ == "__main__":
    main()
