"""``flexkv-store serve``: the admin API and /metrics for a store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Iterator

from flexkv_store.cli._common import (
    EXIT_OK,
    EXIT_USAGE,
    AddCommand,
    CliError,
    console,
    store_config,
)

__all__ = ["register"]


def register(add: AddCommand) -> None:
    """Add the serve subcommand(s)."""
    p = add("serve", "serve the admin API and /metrics for a store",
            "FLEXKV_STORE_ADMIN_TOKEN=s3cret flexkv-store serve --host 0.0.0.0")  # fmt: skip
    p.add_argument("--host", help="bind address (default: admin.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: admin.port, 8000)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


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

    cfg = store_config(args)
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
        err = console(stderr=True)
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
