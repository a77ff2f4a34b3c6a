"""``flexkv-store config check``: validate and print the effective config."""

from __future__ import annotations

import argparse
import json

from flexkv_store.cli._common import EXIT_OK, AddCommand, console, emit_json, store_config

__all__ = ["register"]


def register(add: AddCommand) -> None:
    """Add the config subcommand(s)."""
    p = add("config", "validate and print the effective config (secrets redacted)",
            "flexkv-store config check --config flexkv.yaml")  # fmt: skip
    p.add_argument("action", choices=["check"])
    p.set_defaults(func=cmd_config_check)


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = store_config(args)
    data = cfg.redacted()
    if args.json:
        emit_json({"ok": True, "config": data})
    else:
        con = console()
        con.print("[green]config OK[/green]")
        con.print_json(json.dumps(data))
    return EXIT_OK
