"""The vLLM tier's store and load bandwidth against the fs adapter's own, in one run.

Rows of 16 MiB (vLLM's CPU-tier chunks: 16 blocks of 1 MiB per worker, one worker) in
vLLM's real shared-memory region, on an fs backend with O_DIRECT and io_uring:

* **tier store**: vLLM's ``TieringOffloadingManager.complete_store`` cascades the rows to
  our tier (``FlexKVStoreTier``, built by vLLM's ``SecondaryTierFactory``); timed until
  vLLM has collected every finished job (the scheduler's polling included).
* **tier load**: after vLLM's CPU tier is emptied (``reset_cache``), the scheduler's
  lookup / promotion loop until every row is back in the CPU tier.
* **baseline**: the same fs adapter config, ``put_many`` of the same rows (the same
  shared-memory buffers) into a fresh directory, and ``get_into`` of each back into them
  (gathered, so all reads are in flight at once, as the tier issues them).
* **per rank**: the same bytes stored as one object per TP rank (TP=4: four 4 MiB objects
  per row), the alternative to one object per row that docs/design-decisions.md weighs.

Tier and baseline alternate ``--rounds`` times; figures are GB/s (10^9 bytes/s) with the
median of the per-round ratios. Target: ratio >= 0.9 (the tier adds scheduling, not
copies).

Usage: python bench/vllm_tier.py [--quick] [--rows N] [--rounds K] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and the test helpers importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from vllm_harness import Tiering, offloading_config, random_keys, tier_entry

from bench._util import emit, machine
from flexkv_store.backends import open_adapter
from flexkv_store.keyformat import ObjectKey

MIB = 1 << 20
ROW = 16 * MIB
SPLIT = 4  # the per-TP-rank alternative measured beside: TP=4


def _fs(path: Path) -> dict[str, Any]:
    return {"type": "fs", "path": str(path), "direct_io": True, "io_engine": "io_uring"}


def _tier_round(t: Tiering, n: int) -> tuple[float, float]:
    """One store + load of ``n`` fresh rows through vLLM's manager: (store s, load s)."""
    keys = random_keys(n)
    ctx = t.request("bench")
    out = t.manager.prepare_store(keys, ctx)
    assert out is not None and len(out.keys_to_store) == n
    for chunk in out.store_spec.chunk_ids:  # type: ignore[attr-defined]
        t.rows[int(chunk)] = (int(chunk) * 7 + n) % 251  # contents, not timed
    start = time.perf_counter()
    t.manager.complete_store(keys, ctx)
    t.wait_idle()
    store_s = time.perf_counter() - start
    assert t.tier.store.lru.usage("bench").objects >= n, "the tier did not store every row"
    t.drop_primary()
    ctx = t.request("bench")
    start = time.perf_counter()
    found = t.lookup_all(ctx, keys)
    load_s = time.perf_counter() - start
    assert all(r.name == "HIT" for r in found.values()), "the tier did not load every row"
    t.finish(ctx)
    return store_s, load_s


async def _adapter_round(t: Tiering, cfg: dict[str, Any], n: int) -> tuple[float, float]:
    """The fs adapter alone over the same rows: put_many, then get_into each (gathered)."""
    adapter = open_adapter(cfg)
    try:
        keys = [ObjectKey("bench/base", 0, os.urandom(32)) for _ in range(n)]
        views = [memoryview(t.rows[c]) for c in range(n)]
        start = time.perf_counter()
        await adapter.put_many(list(zip(keys, views, strict=True)))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        got = await asyncio.gather(
            *(adapter.get_into(k, v) for k, v in zip(keys, views, strict=True))
        )
        get_s = time.perf_counter() - start
        assert all(g == ROW for g in got)
        await adapter.delete_many(keys)
    finally:
        await adapter.aclose()
    return put_s, get_s


async def _split_round(t: Tiering, cfg: dict[str, Any], n: int, parts: int) -> tuple[float, float]:
    """The same rows as ``parts`` objects each (one per TP rank at TP=``parts``)."""
    adapter = open_adapter(cfg)
    try:
        size = ROW // parts
        items = [
            (
                ObjectKey("bench/split", r, os.urandom(32)),
                memoryview(t.rows[c])[r * size : (r + 1) * size],
            )
            for c in range(n)
            for r in range(parts)
        ]
        start = time.perf_counter()
        await adapter.put_many(items)
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        got = await asyncio.gather(*(adapter.get_into(k, v) for k, v in items))
        get_s = time.perf_counter() - start
        assert all(g == size for g in got)
        await adapter.delete_many([k for k, _ in items])
    finally:
        await adapter.aclose()
    return put_s, get_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 rows, 2 rounds")
    ap.add_argument("--rows", type=int, default=32, help="rows per round (16 MiB each)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the fs backends live (default: a temp dir)")
    args = ap.parse_args()
    n, rounds = (8, 2) if args.quick else (args.rows, args.rounds)
    base = Path(tempfile.mkdtemp(prefix="flexkv-bench-vllm-", dir=args.dir))
    tier_dir, adapter_dir = base / "tier", base / "adapter"
    t = Tiering(
        offloading_config(
            [tier_entry(backend=_fs(tier_dir))],
            num_chunks=n,
            blocks_per_chunk=16,
            worker_bytes_per_block=MIB,
            kv_events=False,
        )
    )
    loop = asyncio.new_event_loop()
    runs: list[dict[str, float]] = []
    try:
        assert t.row_bytes == ROW
        gb = n * ROW / 1e9
        for _ in range(rounds):
            put_s, get_s = loop.run_until_complete(_adapter_round(t, _fs(adapter_dir), n))
            split_put_s, split_get_s = loop.run_until_complete(
                _split_round(t, _fs(adapter_dir), n, SPLIT)
            )
            store_s, load_s = _tier_round(t, n)
            # The next round stores fresh keys; drop what this one stored so both sides
            # write into directories of the same size.
            t.tier._on_loop(
                t.tier.store.delete_many([k for k, _ in t.tier.store.lru.iter_lru("bench")])
            ).result()
            runs.append(
                {
                    "tier_store_gbps": gb / store_s,
                    "tier_load_gbps": gb / load_s,
                    "adapter_put_many_gbps": gb / put_s,
                    "adapter_get_into_gbps": gb / get_s,
                    "per_rank_put_many_gbps": gb / split_put_s,
                    "per_rank_get_into_gbps": gb / split_get_s,
                }
            )
    finally:
        loop.close()
        t.close()
        shutil.rmtree(base, ignore_errors=True)

    def med(name: str) -> float:
        return round(statistics.median(r[name] for r in runs), 3)

    store_ratios = [r["tier_store_gbps"] / r["adapter_put_many_gbps"] for r in runs]
    load_ratios = [r["tier_load_gbps"] / r["adapter_get_into_gbps"] for r in runs]
    emit(
        {
            "bench": "vllm_tier",
            "machine": machine(),
            "workload": {
                "rows": n,
                "row_bytes": ROW,
                "rounds": rounds,
                "backend": "fs, direct_io, io_uring",
                "through": "vLLM 0.33 TieringOffloadingManager + SecondaryTierFactory",
            },
            "results": {
                "store": {
                    "tier_gbps": med("tier_store_gbps"),
                    "baseline": "fs adapter put_many of the same rows",
                    "baseline_gbps": med("adapter_put_many_gbps"),
                    "ratio": round(statistics.median(store_ratios), 3),
                    "ratio_target": 0.9,
                },
                "load": {
                    "tier_gbps": med("tier_load_gbps"),
                    "baseline": "fs adapter get_into of the same rows",
                    "baseline_gbps": med("adapter_get_into_gbps"),
                    "ratio": round(statistics.median(load_ratios), 3),
                    "ratio_target": 0.9,
                },
            },
            # Why one object per row (docs/design-decisions.md): the same bytes as one object
            # per TP rank (TP=4: four 4 MiB objects per row), same adapter, same run.
            "object_per_row_vs_per_rank": {
                "per_row_put_many_gbps": med("adapter_put_many_gbps"),
                "per_rank_put_many_gbps": med("per_rank_put_many_gbps"),
                "per_row_get_into_gbps": med("adapter_get_into_gbps"),
                "per_rank_get_into_gbps": med("per_rank_get_into_gbps"),
                "put_ratio": round(
                    statistics.median(
                        r["adapter_put_many_gbps"] / r["per_rank_put_many_gbps"] for r in runs
                    ),
                    3,
                ),
                "get_ratio": round(
                    statistics.median(
                        r["adapter_get_into_gbps"] / r["per_rank_get_into_gbps"] for r in runs
                    ),
                    3,
                ),
            },
            "rounds": [{k: round(v, 3) for k, v in r.items()} for r in runs],
        }
    )


if __name__ == "__main__":
    main()
