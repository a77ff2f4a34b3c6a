"""S3 adapter throughput against a plain boto3 loop, both on one moto_server.

Starts its own ``moto_server`` on 127.0.0.1, then for 256 KiB and 4 MiB values measures:
  * the adapter: ``put``/``get`` one at a time, and ``put_many``/``get_many``
    (``max_concurrency`` requests in flight);
  * plain boto3 doing the same put_object/get_object one at a time, and batched through a
    ThreadPoolExecutor of the same size; the plain client gets the same botocore Config
    (path addressing, no extra CRC checksums), so the comparison is like for like.
moto is a Python server and is the bottleneck here: the ratio adapter/plain (target
>= 0.9) is what this measures, not S3's speed.

Usage: python bench/s3.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import botocore.config
from pydantic import SecretStr
from servers import MotoServer, start_moto

from bench._util import adapter_workloads, emit, machine, ratio
from flexkv_store.backends import S3Config
from flexkv_store.backends._s3 import S3Adapter
from flexkv_store.keyformat import ObjectKey

KIB, MIB = 1 << 10, 1 << 20
BUCKET = "flexkv-bench"
CONCURRENCY = 8


async def _timed(fn: Callable[[], Awaitable[int]]) -> float:
    start = time.perf_counter()
    n = await fn()
    return n / (time.perf_counter() - start) / 1e9


async def _measure(server: MotoServer, size: int, count: int, repeat: int) -> dict[str, Any]:
    payloads = [os.urandom(size) for _ in range(4)]
    total = size * count
    keys = [ObjectKey("bench/model", 0, i.to_bytes(8, "big")) for i in range(count)]
    names = [f"plain/{i}" for i in range(count)]
    cfg = S3Config(
        bucket=BUCKET,
        prefix="adapter/",
        endpoint_url=server.endpoint_url,
        region="us-east-1",
        addressing_style="path",
        access_key_id="bench",
        secret_access_key=SecretStr("bench"),
        max_concurrency=CONCURRENCY,
    )
    adapter = S3Adapter(cfg)
    plain = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            max_pool_connections=CONCURRENCY + 4,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    pool = ThreadPoolExecutor(CONCURRENCY)

    def put_one(i: int) -> None:
        plain.put_object(Bucket=BUCKET, Key=names[i], Body=payloads[i % 4])

    def get_one(i: int) -> None:
        plain.get_object(Bucket=BUCKET, Key=names[i])["Body"].read()

    ours = adapter_workloads(adapter, keys, payloads)
    a_put, a_get, a_put_many, a_get_many = (
        ours["put"], ours["get"], ours["put_many"], ours["get_many"]
    )  # fmt: skip

    async def p_put() -> int:  # a plain synchronous loop, as a user would write it
        for i in range(count):
            put_one(i)
        return total

    async def p_get() -> int:
        for i in range(count):
            get_one(i)
        return total

    async def p_put_many() -> int:
        list(pool.map(put_one, range(count)))
        return total

    async def p_get_many() -> int:
        list(pool.map(get_one, range(count)))
        return total

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
            a_rates, p_rates = [], []
            for _ in range(repeat):  # interleaved, so drift hits both alike
                a_rates.append(await _timed(a_fn))
                p_rates.append(await _timed(p_fn))
            a_gbs, p_gbs = statistics.median(a_rates), statistics.median(p_rates)
            result[op] = {
                "adapter_gbs": round(a_gbs, 3),
                "plain_gbs": round(p_gbs, 3),
                "adapter_over_plain": ratio(a_gbs, p_gbs),
            }
    finally:
        await adapter.aclose()
        pool.shutdown()
        plain.close()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and prints) the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs")
    args = parser.parse_args(argv)
    repeat = 3 if args.quick else 5
    budget = (16 if args.quick else 48) * MIB  # payload bytes per timed run
    with tempfile.TemporaryDirectory(prefix="flexkv-bench-s3-") as tmp:
        server = start_moto(Path(tmp))
        try:
            boto3.client(
                "s3",
                endpoint_url=server.endpoint_url,
                region_name="us-east-1",
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
            ).create_bucket(Bucket=BUCKET)
            results = {
                f"{size // KIB}KiB": asyncio.run(_measure(server, size, budget // size, repeat))
                for size in (256 * KIB, 4 * MIB)
            }
        finally:
            server.stop()
    out = {
        "benchmark": "s3",
        "machine": machine(),
        "notes": (
            "GB/s of payload, median of runs, against one moto_server on 127.0.0.1 (moto is "
            f"the bottleneck); batches with {CONCURRENCY} requests in flight on both sides"
        ),
        "results": results,
    }
    emit(out)
    return out


if __name__ == "__main__":
    main()
