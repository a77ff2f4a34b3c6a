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
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove corrupt objects and temp files; settle a shared accounting (objects "
        "it adopts over a quota are evicted)",
    )
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
                   f"{acct_report['forgotten']} forgotten, "
                   f"{acct_report['evicted']} evicted over quota" if args.repair else "")
            )  # fmt: skip
        if problems and not args.repair:
            con.print("run again with --repair to remove them (and reconcile the accounting)")
    return EXIT_FAILED if unrepaired > 0 else EXIT_OK


async def _check_accounting(cfg: Any, *, repair: bool) -> dict[str, Any] | None:
    """A shared accounting against what the backends hold (a local one has nothing to
    check: it lives in each process). ``repair`` settles pending admissions that are old
    or whose process is gone, and adopts stored objects it misses; what that takes over a
    quota is evicted (deleted from every backend), and nothing else is deleted."""
    from flexkv_store.backends import open_adapter
    from flexkv_store.store import Store, accounting_for

    acct = accounting_for(cfg)
    if not acct.shared:
        return None
    await acct.open()
    try:
        found: dict[Any, Any] = {}
        for acfg in cfg.adapters:
            async with open_adapter(acfg) as adapter:
                if adapter.capabilities.listing:
                    async for info in adapter.scan():
                        found.setdefault(info.key, info)
        # oldest first, as a store's rebuild orders them (what reconcile adopts keeps it)
        ordered = sorted(found.values(), key=lambda i: i.last_modified)
        present: dict[Any, int] = {i.key: i.size for i in ordered}
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
            settled = await acct.reconcile(present, older_than=Store.reconcile_after)
            evicted = await _evict(cfg, acct, settled.victims)
            report |= {
                "committed": settled.committed,
                "forgotten": settled.forgotten,
                "evicted": evicted,
            }
            report["pending"] = len(await acct.pending())
            report["unaccounted"] = 0
        return report
    finally:
        await acct.close()


async def _evict(cfg: Any, acct: Any, victims: list[Any]) -> int:
    """Delete what reconcile adopted over a quota (already out of the accounting) from
    every backend, as a store's eviction does; a victim some backend failed to delete is
    accounted again (it is still stored). How many are gone."""
    from flexkv_store.backends import open_adapter
    from flexkv_store.errors import StorageError

    if not victims:
        return 0
    keys = [k for k, _ in victims]
    stuck: set[Any] = set()
    try:
        for acfg in cfg.adapters:
            try:
                async with open_adapter(acfg) as adapter:
                    await adapter.delete_many(keys)
            except StorageError:
                stuck.update(keys)  # some may still be stored there
    except BaseException:
        stuck.update(keys)  # what was deleted is not known: still stored, for all we know
        raise
    finally:
        if stuck:
            await acct.restore([v for v in victims if v[0] in stuck])
    return len(victims) - len(stuck)


def _printable(name: str) -> str:
    """A foreign name as text a terminal can show (undecodable bytes as escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
