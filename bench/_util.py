"""Small helpers shared by the bench scripts: timing and JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def best_rate(fn: Callable[[], int], *, repeat: int = 5, min_time: float = 0.2) -> float:
    """Units per second of ``fn`` (which returns how many units it did): median of runs."""
    rates = []
    for _ in range(repeat):
        done = 0
        start = time.perf_counter()
        while True:
            done += fn()
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        rates.append(done / elapsed)
    return statistics.median(rates)


def ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 3) if baseline else None


def machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


def adapter_workloads(
    adapter: Any, keys: list[Any], payloads: list[bytes]
) -> dict[str, Callable[[], Awaitable[int]]]:
    """The adapter side of a backend bench: ``put``/``get`` one at a time and as batches.

    Each returns the payload bytes it moved; keys cycle through ``payloads``.
    """
    total = len(payloads[0]) * len(keys)

    async def put() -> int:
        for i, k in enumerate(keys):
            await adapter.put(k, payloads[i % len(payloads)])
        return total

    async def get() -> int:
        for k in keys:
            await adapter.get(k)
        return total

    async def put_many() -> int:
        await adapter.put_many((k, payloads[i % len(payloads)]) for i, k in enumerate(keys))
        return total

    async def get_many() -> int:
        await adapter.get_many(keys)
        return total

    return {"put": put, "get": get, "put_many": put_many, "get_many": get_many}
