"""``flexkv-store quota``: set, get, list or delete quotas through a running admin API."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from flexkv_store.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    AddCommand,
    CliError,
    console,
    emit_json,
    human,
    store_config,
)

__all__ = ["register"]


def register(add: AddCommand) -> None:
    """Add the quota subcommand(s)."""
    p = add("quota", "set, get, list or delete quotas through a running admin API",
            "flexkv-store quota set alice --gb 1 --url http://127.0.0.1:8000")  # fmt: skip
    p.add_argument("action", choices=["set", "get", "list", "delete"])
    p.add_argument("salt", nargs="?", help="cache salt (_default for the empty salt)")
    p.add_argument("--gb", type=float, help="quota in GiB (set)")
    p.add_argument("--bytes", type=int, help="quota in bytes (set)")
    p.add_argument("--url", help="admin API base URL (default: from admin.host/port)")
    p.set_defaults(func=cmd_quota)


def _api_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    cfg = store_config(args)
    return f"http://{cfg.admin.host}:{cfg.admin.port}"


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Accept": "application/json"}
    token = os.environ.get("FLEXKV_STORE_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error")
        except (ValueError, AttributeError):
            detail = exc.reason
        raise CliError(f"{method} {url}: HTTP {exc.code}: {detail}", EXIT_FAILED) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"admin API at {url} unreachable: {exc}", EXIT_UNAVAILABLE) from None


def _salt_path(salt: str) -> str:
    return urllib.parse.quote(salt, safe="")


def cmd_quota(args: argparse.Namespace) -> int:
    base = _api_url(args) + "/api/quota"
    if args.action == "list":
        data = _http("GET", base)
    elif args.action == "get":
        data = _http("GET", f"{base}/{_salt_path(args.salt)}")
    elif args.action == "delete":
        data = _http("DELETE", f"{base}/{_salt_path(args.salt)}")
    else:
        if (args.gb is None) == (args.bytes is None):
            raise CliError("quota set: give exactly one of --gb and --bytes", EXIT_USAGE)
        body = {"limit_gb": args.gb} if args.gb is not None else {"limit_bytes": args.bytes}
        data = _http("PUT", f"{base}/{_salt_path(args.salt)}", body)
    if args.json:
        emit_json(data)
        return EXIT_OK
    from rich.table import Table

    if args.action == "list":
        table = Table(title="quotas")
        for col in ("cache_salt", "limit", "usage", "objects"):
            table.add_column(col, justify="left" if col == "cache_salt" else "right")
        for salt, q in sorted(data["users"].items()):
            table.add_row(salt, human(q["limit_bytes"]), human(q["current_usage_bytes"]),
                          str(q["objects"]))  # fmt: skip
        console().print(table)
    else:
        console().print_json(json.dumps(data))
    return EXIT_OK
