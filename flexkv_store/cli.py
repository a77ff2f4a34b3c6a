"""The ``flexkv-store`` command.

Config comes from ``--config FILE`` or ``FLEXKV_STORE_CONFIG`` (and ``FLEXKV_STORE_*``
variables); ``--backend URL`` replaces the configured backends; the admin token comes from
``FLEXKV_STORE_ADMIN_TOKEN``. Exit codes: 0 ok, 1 a failure (corrupt objects found, a demo
check failed), 2 bad usage or config, 3 a backend or the admin API unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from flexkv_store.errors import BackendUnavailableError, ConfigError, FlexKVStoreError

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


class CliError(Exception):
    """A failure reported as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _human(n: float | int | None) -> str:
    if n is None:
        return "unlimited"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def _store_config(args: argparse.Namespace) -> Any:
    from flexkv_store.config import load_config

    source: Any = args.config
    cfg = load_config(source)
    if getattr(args, "backend", None):
        data = cfg.model_dump(exclude={"backend", "backends"})
        data["admin"]["token"] = cfg.admin.token.get_secret_value() if cfg.admin.token else None
        data["backend"] = args.backend
        cfg = load_config(data)
    return cfg


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from flexkv_store.quota.api import create_app
    except ImportError as exc:
        raise CliError(
            f"serve needs the server extra ({exc.name} missing): "
            "pip install 'flexkv-store[server]'",
            EXIT_USAGE,
        ) from None
    from flexkv_store.store import Store, open_store

    cfg = _store_config(args)
    host = args.host or cfg.admin.host
    port = cfg.admin.port if args.port is None else args.port
    # FLEXKV_STORE_ADMIN_TOKEN is already in cfg, below an explicit config file
    token = cfg.admin.token.get_secret_value() if cfg.admin.token else None
    from flexkv_store.config import is_loopback_host

    if not is_loopback_host(host) and not token:
        raise CliError(
            f"refusing to serve the admin API on non-loopback address {host!r} without a "
            "token: set FLEXKV_STORE_ADMIN_TOKEN (or admin.token in the config)",
            EXIT_USAGE,
        )
    store: Store = open_store(cfg)
    app = create_app(
        store, token=token, local_requests_need_token=cfg.admin.local_requests_need_token
    )

    class GracefulServer(uvicorn.Server):
        """Stops on SIGINT/SIGTERM after finishing requests, then lets us close the store
        and exit 0 (uvicorn would re-raise the signal and skip our clean-up)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    captured = getattr(self, "_captured_signals", None)
                    if isinstance(captured, list):
                        captured.clear()

    server = GracefulServer(
        uvicorn.Config(app, host=host, port=port, log_level=args.log_level, access_log=False)
    )

    async def run() -> None:
        await store.open()
        err = _console(stderr=True)
        err.print(
            f"flexkv-store serving the admin API on http://{host}:{port} "
            f"(docs at /docs, metrics at /metrics; backends: "
            f"{', '.join(b['label'] for b in store.info()['backends'])}; "
            f"auth: {'bearer token' if token else 'none'})"
        )
        try:
            await server.serve()  # handles SIGINT/SIGTERM: finishes requests, then returns
        finally:
            await store.close()
            err.print("flexkv-store: stopped, store closed")

    asyncio.run(run())
    return EXIT_OK


# -- config check --------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _store_config(args)
    data = cfg.redacted()
    if args.json:
        _emit_json({"ok": True, "config": data})
    else:
        con = _console()
        con.print("[green]config OK[/green]")
        con.print_json(json.dumps(data))
    return EXIT_OK


# -- ls / du -------------------------------------------------------------------------------


async def _scan(args: argparse.Namespace) -> list[Any]:
    from flexkv_store.backends import open_adapter

    cfg = _store_config(args)
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
        _emit_json(
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
            k.cache_salt or "_default", _human(info.size),
        )  # fmt: skip
    _console().print(table)
    return EXIT_OK


async def _accounted(args: argparse.Namespace) -> dict[str, tuple[int, int]] | None:
    """Usage per salt as a shared accounting holds it (what quotas are enforced on)."""
    from flexkv_store.store import accounting_for

    acct = accounting_for(_store_config(args))
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
        _emit_json(
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
        table.add_row(b, m, s, str(o), _human(n))
    scanned = [v for (b, _, _), v in totals.items() if b != "accounting"]
    table.add_row("", "", "total", str(sum(o for o, _ in scanned)),
                  _human(sum(n for _, n in scanned)), style="bold")  # fmt: skip
    _console().print(table)
    return EXIT_OK


# -- quota (against a running admin API) ---------------------------------------------------


def _api_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    cfg = _store_config(args)
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
        _emit_json(data)
        return EXIT_OK
    from rich.table import Table

    if args.action == "list":
        table = Table(title="quotas")
        for col in ("cache_salt", "limit", "usage", "objects"):
            table.add_column(col, justify="left" if col == "cache_salt" else "right")
        for salt, q in sorted(data["users"].items()):
            table.add_row(salt, _human(q["limit_bytes"]), _human(q["current_usage_bytes"]),
                          str(q["objects"]))  # fmt: skip
        _console().print(table)
    else:
        _console().print_json(json.dumps(data))
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------

EXAMPLES = """\
examples:
  flexkv-store demo                                  # the multi-tenant offload demo
  flexkv-store serve --port 8000                     # admin API + /metrics on 127.0.0.1
  FLEXKV_STORE_ADMIN_TOKEN=s3cret flexkv-store quota set alice --gb 1
  flexkv-store du --backend redis://127.0.0.1:6379/0
  flexkv-store ls --backend 's3://bucket/kv?endpoint_url=http://127.0.0.1:9000' --json
  flexkv-store fsck --backend fs:///var/cache/kv --repair
  flexkv-store config check --config flexkv.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexkv-store",
        description="KV cache storage for LLM inference engines: backends, quotas, admin API.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (YAML/JSON); default $FLEXKV_STORE_CONFIG")
    common.add_argument("--backend", help="backend URL, replacing the configured backends")
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, parents=[common], help=help_text, description=help_text,
            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

    p = add("serve", "serve the admin API and /metrics for a store",
            "FLEXKV_STORE_ADMIN_TOKEN=s3cret flexkv-store serve --host 0.0.0.0")  # fmt: skip
    p.add_argument("--host", help="bind address (default: admin.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: admin.port, 8000)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

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

    p = add("quota", "set, get, list or delete quotas through a running admin API",
            "flexkv-store quota set alice --gb 1 --url http://127.0.0.1:8000")  # fmt: skip
    p.add_argument("action", choices=["set", "get", "list", "delete"])
    p.add_argument("salt", nargs="?", help="cache salt (_default for the empty salt)")
    p.add_argument("--gb", type=float, help="quota in GiB (set)")
    p.add_argument("--bytes", type=int, help="quota in bytes (set)")
    p.add_argument("--url", help="admin API base URL (default: from admin.host/port)")
    p.set_defaults(func=cmd_quota)

    p = add("config", "validate and print the effective config (secrets redacted)",
            "flexkv-store config check --config flexkv.yaml")  # fmt: skip
    p.add_argument("action", choices=["check"])
    p.set_defaults(func=cmd_config_check)

    _add_more_commands(add)
    return parser


def _add_more_commands(add: Any) -> None:
    """Commands that live in their own modules (demo, bench, fsck)."""
    from flexkv_store import _cli_tools

    _cli_tools.register(add)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flexkv-store`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from flexkv_store import __version__

        print(__version__)
        return EXIT_OK
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.command == "quota" and args.action != "list" and not args.salt:
        parser.error("quota set/get/delete need a cache salt")
    try:
        return int(args.func(args))
    except CliError as exc:
        _console(stderr=True).print(f"[red]error:[/red] {exc}")
        return exc.code
    except ConfigError as exc:
        _console(stderr=True).print(f"[red]config error:[/red] {exc}")
        return EXIT_USAGE
    except BackendUnavailableError as exc:
        _console(stderr=True).print(f"[red]backend unavailable:[/red] {exc}")
        return EXIT_UNAVAILABLE
    except FlexKVStoreError as exc:
        _console(stderr=True).print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
