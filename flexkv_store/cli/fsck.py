"""``flexkv-store fsck``: verify every object and the shared accounting; repair on request."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from flexkv_store.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    AddCommand,
    console,
    emit_json,
    human,
    store_config,
)

__all__ = ["register"]


def register(add: AddCommand) -> None:
    """Add the fsck subcommand(s)."""
    p = add("fsck", "verify every object's header and checksum; --repair removes bad ones",
            "flexkv-store fsck --backend fs:///var/cache/kv --repair")  # fmt: skip
    p.add_argument("--repair", action="store_true", help="remove corrupt objects and temp files")
    p.add_argument(
        "--remove-foreign",
        action="store_true",
        help="also remove what is not ours (files or keys without our header, e.g. LMCache's); "
        "nothing else ever removes them",
    )
    p.set_defaults(func=cmd_fsck)


def cmd_fsck(args: argparse.Namespace) -> int:
    from flexkv_store.backends import open_adapter

    cfg = store_config(args)

    async def run() -> list[tuple[str, Any]]:
        out = []
        for acfg in cfg.adapters:
            async with open_adapter(acfg) as adapter:
                out.append(
                    (
                        acfg.type,
                        await adapter.check(repair=args.repair, remove_foreign=args.remove_foreign),
                    )
                )
        return out

    reports = asyncio.run(run())
    acct_report = asyncio.run(_check_accounting(cfg, repair=args.repair))
    problems = sum(len(r.corrupt) + len(r.temp_files) for _, r in reports)
    unrepaired = (
        problems
        if not args.repair
        else sum(len(r.corrupt) + len(r.temp_files) - r.removed for _, r in reports)
    )
    if acct_report is not None:
        problems += acct_report["pending"] + acct_report["unaccounted"]
    if args.json:
        out: list[dict[str, Any]] = [{"backend": name, **vars(r)} for name, r in reports]
        if acct_report is not None:
            out.append({"accounting": acct_report})
        emit_json(out)
    else:
        con = console()
        for name, r in reports:
            status = "[green]clean[/green]" if r.ok else "[red]problems found[/red]"
            con.print(f"{name}: {r.objects} objects, {human(r.bytes)}: {status}")
            for what in r.corrupt:
                con.print(f"  corrupt: {what}")
            for path in r.temp_files:
                con.print(f"  temp file: {path}")
            for path in map(_printable, r.foreign):
                if args.remove_foreign:
                    con.print(f"  not ours: {path}", markup=False)
                else:
                    con.print(f"  not ours (left alone): {path}", style="dim", markup=False)
            if args.remove_foreign:
                con.print(f"  removed {r.foreign_removed} foreign object(s)")
            if args.repair:
                con.print(f"  removed {r.removed}")
        if acct_report is not None:
            con.print(
                f"accounting {acct_report['where']}: {acct_report['accounted']} objects "
                f"accounted, {acct_report['pending']} admission(s) pending, "
                f"{acct_report['unaccounted']} stored object(s) not accounted, "
                f"{acct_report['missing']} accounted but not found"
                + (f"; reconciled: {acct_report['committed']} committed, "
                   f"{acct_report['forgotten']} forgotten" if args.repair else "")
            )  # fmt: skip
        if problems and not args.repair:
            con.print("run again with --repair to remove them (and reconcile the accounting)")
    return EXIT_FAILED if unrepaired > 0 else EXIT_OK


async def _check_accounting(cfg: Any, *, repair: bool) -> dict[str, Any] | None:
    """A shared accounting against what the backends hold (a local one has nothing to
    check: it lives in each process). ``repair`` settles pending admissions that are old
    or whose process is gone, and accounts stored objects it misses; it deletes nothing."""
    from flexkv_store.backends import open_adapter
    from flexkv_store.store import Store, accounting_for

    acct = accounting_for(cfg)
    if not acct.shared:
        return None
    await acct.open()
    try:
        present: dict[Any, int] = {}
        for acfg in cfg.adapters:
            async with open_adapter(acfg) as adapter:
                if adapter.capabilities.listing:
                    async for info in adapter.scan():
                        present.setdefault(info.key, info.size)
        accounted = dict(await acct.lru_order())
        pending = await acct.pending()
        report: dict[str, Any] = {
            "where": acct.describe(),
            "accounted": len(accounted),
            "pending": len(pending),
            "unaccounted": sum(1 for key in present if key not in accounted),
            "missing": sum(1 for key in accounted if key not in present),
        }
        if repair:
            committed, forgotten = await acct.reconcile(present, older_than=Store.reconcile_after)
            report |= {"committed": committed, "forgotten": forgotten}
            report["pending"] = len(await acct.pending())
            report["unaccounted"] = 0
        return report
    finally:
        await acct.close()


def _printable(name: str) -> str:
    """A foreign name as text a terminal can show (undecodable bytes as escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
