"""``flexkv-store demo``: a multi-tenant KV offload workload through the real store."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from flexkv_store.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    MIB,
    AddCommand,
    CliError,
    console,
    emit_json,
    store_config,
)

__all__ = ["register"]


def register(add: AddCommand) -> None:
    """Add the demo subcommand(s)."""
    p = add("demo", "run a multi-tenant KV offload workload through the real store",
            "flexkv-store demo --requests 24")  # fmt: skip
    p.add_argument("--requests", type=int, default=24, help="requests per tenant (default 24)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.set_defaults(func=cmd_demo)


DEMO_MODEL = "flexkv-demo/llama-mini"
DEMO_LAYERS = 8
DEMO_BLOCK = 16  # tokens per block
DEMO_HEADS = 8
DEMO_HEAD_SIZE = 64
DEMO_BLOCKS_PER_CHUNK = 4
DEMO_NUM_BLOCKS = 512
#: (tenant, quota MiB, documents, tokens per document); carol's working set exceeds her quota.
DEMO_TENANTS = (("alice", 96, 4, 1024), ("bob", 48, 3, 768), ("carol", 12, 4, 1024))


@dataclass
class TenantStats:
    quota: int = 0
    lookups: int = 0
    hits: int = 0
    put_bytes: int = 0
    put_seconds: float = 0.0
    get_bytes: int = 0
    get_seconds: float = 0.0
    verified: int = 0
    mismatches: int = 0
    chunk_hits: list[int] = field(default_factory=list)


def _fill_chunk_blocks(torch: Any, caches: list[Any], first: int, last: int, seed: int) -> None:
    """Write the KV an engine would compute for blocks ``first..last-1``: deterministic in
    ``seed`` (random bit patterns, so a reload must match bit for bit)."""
    import numpy as np

    part0 = caches[0][:, first:last]
    nbytes = part0.numel() * part0.element_size()
    raw = np.random.default_rng(seed).bytes(nbytes * len(caches))
    bits = torch.frombuffer(bytearray(raw), dtype=part0.dtype).view(len(caches), *part0.shape)
    for i, layer in enumerate(caches):
        layer[:, first:last].copy_(bits[i])


async def _demo(
    args: argparse.Namespace, cfg: Any
) -> tuple[dict[str, TenantStats], dict[str, Any]]:
    import torch
    from rich.progress import Progress

    from flexkv_store.keyformat import chunk_keys
    from flexkv_store.store import open_store

    store = open_store(cfg)
    shape = (2, DEMO_NUM_BLOCKS, DEMO_BLOCK, DEMO_HEADS, DEMO_HEAD_SIZE)
    # One allocation, per-layer views: the layout vLLM uses, and one copy call for all layers.
    pool = torch.zeros((DEMO_LAYERS, *shape), dtype=torch.bfloat16)
    caches = [pool[i] for i in range(DEMO_LAYERS)]
    expected = torch.zeros_like(pool)  # what the "engine" computes, to verify reloads against
    check = [expected[i] for i in range(DEMO_LAYERS)]
    chunk_tokens = DEMO_BLOCK * DEMO_BLOCKS_PER_CHUNK
    stats = {t: TenantStats(quota=q * MIB) for t, q, _, _ in DEMO_TENANTS}
    rng = torch.Generator().manual_seed(args.seed)
    docs = {
        t: [torch.randint(0, 32000, (n_tok,), generator=rng).tolist() for _ in range(n_docs)]
        for t, _, n_docs, n_tok in DEMO_TENANTS
    }
    async with store:
        for tenant, quota_mib, _, _ in DEMO_TENANTS:
            await store.quota.set_quota(tenant, quota_mib * MIB)
        evicted_before = {t: store.lru.evictions(t).objects for t in stats}
        plan = []
        order = torch.Generator().manual_seed(args.seed + 1)
        for i in range(args.requests):
            for tenant in stats:
                d = int(torch.randint(0, len(docs[tenant]), (1,), generator=order))
                # a request reuses a prefix of a document, as chat turns and shared prompts do
                cut = int(torch.randint(len(docs[tenant][d]) // 2, len(docs[tenant][d]) + 1, (1,),
                                        generator=order))  # fmt: skip
                plan.append((tenant, docs[tenant][d][:cut], i))
        with Progress(transient=True) as progress:
            task = progress.add_task("offloading and reloading KV chunks", total=len(plan))
            for tenant, tokens, _ in plan:
                st = stats[tenant]
                # hashes chained per engine block, a chunk keyed by its last block (as vLLM)
                keys = chunk_keys(tokens, model_name=DEMO_MODEL, kv_rank=0, chunk_size=chunk_tokens,
                                  block_size=DEMO_BLOCK, cache_salt=tenant)  # fmt: skip
                if not keys:
                    progress.advance(task)
                    continue
                block_ids = list(range(len(keys) * DEMO_BLOCKS_PER_CHUNK))
                st.lookups += len(keys)
                t0 = time.perf_counter()
                loaded = await store.get_blocks(keys, caches, block_ids, "vllm")
                if loaded:
                    st.get_seconds += time.perf_counter() - t0
                    st.get_bytes += loaded * _chunk_nbytes()
                st.hits += loaded
                # verify what was loaded against what the "engine" computes for those chunks
                for c in range(loaded):
                    a, b = c * DEMO_BLOCKS_PER_CHUNK, (c + 1) * DEMO_BLOCKS_PER_CHUNK
                    _fill_chunk_blocks(torch, check, a, b, _seed(keys[c]))
                    same = all(
                        torch.equal(check[li][:, a:b].view(torch.int16),
                                    caches[li][:, a:b].view(torch.int16))
                        for li in range(DEMO_LAYERS)
                    )  # fmt: skip
                    st.verified += 1
                    st.mismatches += not same
                # compute the missing chunks and offload them
                if loaded < len(keys):
                    for c in range(loaded, len(keys)):
                        a, b = c * DEMO_BLOCKS_PER_CHUNK, (c + 1) * DEMO_BLOCKS_PER_CHUNK
                        _fill_chunk_blocks(torch, caches, a, b, _seed(keys[c]))
                    rest = block_ids[loaded * DEMO_BLOCKS_PER_CHUNK :]
                    t0 = time.perf_counter()
                    await store.put_blocks(keys[loaded:], caches, rest, "vllm")
                    st.put_seconds += time.perf_counter() - t0
                    st.put_bytes += (len(keys) - loaded) * _chunk_nbytes()
                progress.advance(task)
        report: dict[str, Any] = {"tenants": {}, "store": store.info()}
        for tenant, st in stats.items():
            used = store.lru.usage(tenant)
            report["tenants"][tenant] = {
                "quota_bytes": st.quota,
                "usage_bytes": used.nbytes,
                "objects": used.objects,
                "evictions": store.lru.evictions(tenant).objects - evicted_before[tenant],
                "lookups": st.lookups,
                "hits": st.hits,
                "hit_rate": round(st.hits / st.lookups, 3) if st.lookups else 0.0,
                "offload_gb_s": round(st.put_bytes / st.put_seconds / 1e9, 3)
                if st.put_seconds
                else None,
                "reload_gb_s": round(st.get_bytes / st.get_seconds / 1e9, 3)
                if st.get_seconds
                else None,
                "verified_chunks": st.verified,
                "mismatches": st.mismatches,
            }
    return stats, report


def _chunk_nbytes() -> int:
    return 2 * DEMO_LAYERS * DEMO_BLOCKS_PER_CHUNK * DEMO_BLOCK * DEMO_HEADS * DEMO_HEAD_SIZE * 2


def _seed(key: Any) -> int:
    return int.from_bytes(key.chunk_hash[:8], "big") & ((1 << 63) - 1)


def cmd_demo(args: argparse.Namespace) -> int:

    try:
        import torch  # noqa: F401
    except ImportError:
        raise CliError("the demo needs torch: pip install torch", 2) from None
    cfg = store_config(args)
    where = ", ".join(f"{a.type}:{getattr(a, 'path', '')}" for a in cfg.adapters)
    started = time.perf_counter()
    _, report = asyncio.run(_demo(args, cfg))
    elapsed = time.perf_counter() - started
    report["seconds"] = round(elapsed, 2)
    bad = sum(t["mismatches"] for t in report["tenants"].values())
    if args.json:
        emit_json(report)
        return EXIT_FAILED if bad else EXIT_OK
    from rich import box
    from rich.table import Table

    table = Table(title=f"KV offload demo on {where} ({elapsed:.1f} s)", box=box.SIMPLE_HEAD)
    for col in ("tenant", "quota\nMiB", "used\nMiB", "objects", "evicted", "hit\nrate",
                "put\nGB/s", "get\nGB/s", "verified"):  # fmt: skip
        table.add_column(col, justify="left" if col == "tenant" else "right", no_wrap=True,
                         min_width=len(col.split("\n")[0]))  # fmt: skip
    for tenant, t in report["tenants"].items():
        table.add_row(
            tenant, f"{t['quota_bytes'] / MIB:.0f}", f"{t['usage_bytes'] / MIB:.0f}",
            str(t["objects"]), str(t["evictions"]),
            f"{100 * t['hit_rate']:.0f}%",
            "-" if t["offload_gb_s"] is None else f"{t['offload_gb_s']:.2f}",
            "-" if t["reload_gb_s"] is None else f"{t['reload_gb_s']:.2f}",
            f"{t['verified_chunks'] - t['mismatches']}/{t['verified_chunks']}",
        )  # fmt: skip
    con = console()
    con.print(table)
    engine = report["store"]["backends"][0]
    con.print(
        f"backend: {engine.get('adapter')} (io engine: {engine.get('io_engine', '-')}); "
        f"quota state: {report['store']['quota_state']}. Run it again: the chunks left in the "
        "cache are hits."
    )
    if bad:
        con.print(f"[red]{bad} reloaded chunk(s) differed from what was offloaded[/red]")
        return EXIT_FAILED
    return EXIT_OK
