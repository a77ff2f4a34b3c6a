"""The ``flexkv-store`` command: a small package, one module per command group.

Config comes from ``--config FILE`` or ``FLEXKV_STORE_CONFIG`` (and ``FLEXKV_STORE_*``
variables); ``--backend URL`` replaces the configured backends; the admin token comes from
``FLEXKV_STORE_ADMIN_TOKEN``. Exit codes: 0 ok, 1 a failure (corrupt objects found, a demo
check failed), 2 bad usage or config, 3 a backend or the admin API unreachable.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flexkv_store.cli import bench, config, demo, fsck, listing, quota, serve
from flexkv_store.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
    console,
)
from flexkv_store.errors import BackendUnavailableError, ConfigError, FlexKVStoreError

__all__ = ["build_parser", "main"]

#: The command modules, in the order ``--help`` lists their commands.
COMMANDS = (serve, listing, quota, config, demo, bench, fsck)

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

    for module in COMMANDS:
        module.register(add)
    return parser


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
        console(stderr=True).print(f"[red]error:[/red] {exc}")
        return exc.code
    except ConfigError as exc:
        console(stderr=True).print(f"[red]config error:[/red] {exc}")
        return EXIT_USAGE
    except BackendUnavailableError as exc:
        console(stderr=True).print(f"[red]backend unavailable:[/red] {exc}")
        return EXIT_UNAVAILABLE
    except FlexKVStoreError as exc:
        console(stderr=True).print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
