"""``flexkv-store ls`` and ``du``: what the backends hold, by model and salt."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from flexkv_store.cli._common import EXIT_OK, AddCommand, console, emit_json, human, store_config

__all__ = ["register"]


def register(add: AddCommand) -> None:
    """Add the ls and du subcommand(s)."""
    p = add(
        "ls", "list stored objects", "flexkv-store ls --backend fs:///var/cache/kv --salt alice"
    )
    p.add_argument("--model", help="only this model")
    p.add_argument("--salt", help="only this cache salt ('' for unsalted)")
    p.add_argument("--limit", type=int, help="show at most N objects")
    p.set_defaults(func=cmd_ls)

    p = add("du", "objects and bytes by backend, model and salt",
            "flexkv-store du --backend redis://127.0.0.1:6379/0")  # fmt: skip
    p.add_argument("--model", help="only this model")
    p.add_argument("--salt", help="only this cache salt")
    p.set_defaults(func=cmd_du)


async def _scan(args: argparse.Namespace) -> list[Any]:
    from flexkv_store.backends import open_adapter

    cfg = store_config(args)
    out = []
    for acfg in cfg.adapters:
        async with open_adapter(acfg) as adapter:
            async for info in adapter.scan(model_name=args.model, cache_salt=args.salt):
                out.append((adapter.name, info))
    return out


def cmd_ls(args: argparse.Namespace) -> int:
    rows = asyncio.run(_scan(args))
    rows.sort(key=lambda r: (r[1].key.model_name, r[1].key.cache_salt, r[1].key.chunk_hash))
    if args.limit is not None:
        rows = rows[: args.limit]
    if args.json:
        emit_json(
            [
                {
                    "backend": name,
                    "key": info.key.to_wire(),
                    "model_name": info.key.model_name,
                    "kv_rank": info.key.kv_rank,
                    "chunk_hash": info.key.chunk_hash.hex(),
                    "cache_salt": info.key.cache_salt,
                    "size": info.size,
                    "last_modified": info.last_modified,
                }
                for name, info in rows
            ]
        )
        return EXIT_OK
    from rich.table import Table

    table = Table(title=f"{len(rows)} objects")
    for col in ("backend", "model", "rank", "chunk hash", "salt", "size"):
        table.add_column(col, justify="right" if col in ("rank", "size") else "left")
    for name, info in rows:
        k = info.key
        table.add_row(
            name, k.model_name, str(k.kv_rank), k.chunk_hash.hex()[:16],
            k.cache_salt or "_default", human(info.size),
        )  # fmt: skip
    console().print(table)
    return EXIT_OK


async def _accounted(args: argparse.Namespace) -> dict[str, tuple[int, int]] | None:
    """Usage per salt as a shared accounting holds it (what quotas are enforced on)."""
    from flexkv_store.store import accounting_for

    acct = accounting_for(store_config(args))
    if not acct.shared:
        return None
    await acct.open()
    try:
        snap = await acct.report()
    finally:
        await acct.close()
    return {
        r.salt or "_default": (r.used.objects, r.used.nbytes)
        for r in snap.salts
        if r.used.objects and (args.salt is None or r.salt == args.salt)
    }


def cmd_du(args: argparse.Namespace) -> int:
    rows = asyncio.run(_scan(args))
    totals: dict[tuple[str, str, str], list[int]] = {}
    for name, info in rows:
        t = totals.setdefault(
            (name, info.key.model_name, info.key.cache_salt or "_default"), [0, 0]
        )
        t[0] += 1
        t[1] += info.size
    # With a shared accounting, also what it holds per salt (all models), beside the scan.
    accounted = asyncio.run(_accounted(args)) if args.model is None else None
    for salt, (objects, nbytes) in (accounted or {}).items():
        totals[("accounting", "*", salt)] = [objects, nbytes]
    if args.json:
        emit_json(
            [
                {"backend": b, "model_name": m, "cache_salt": s, "objects": o, "bytes": n}
                for (b, m, s), (o, n) in sorted(totals.items())
            ]
        )
        return EXIT_OK
    from rich.table import Table

    table = Table(title="usage by backend, model and salt")
    for col in ("backend", "model", "salt", "objects", "bytes"):
        table.add_column(col, justify="right" if col in ("objects", "bytes") else "left")
    for (b, m, s), (o, n) in sorted(totals.items()):
        table.add_row(b, m, s, str(o), human(n))
    scanned = [v for (b, _, _), v in totals.items() if b != "accounting"]
    table.add_row("", "", "total", str(sum(o for o, _ in scanned)),
                  human(sum(n for _, n in scanned)), style="bold")  # fmt: skip
    console().print(table)
    return EXIT_OK
