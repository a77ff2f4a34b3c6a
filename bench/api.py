"""Admin API requests/s over a real socket, beside a bare FastAPI route on the same server.

The baseline is the framework's floor: a FastAPI route returning a constant JSON object,
served by the same uvicorn set-up and driven by the same client loop. The ratio says what
our handlers (salt validation, quota accounting, JSON shaping, auth) cost on top.

Usage: python bench/api.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import uvicorn
from fastapi import FastAPI

from bench._util import emit, machine, ratio
from flexkv_store.quota.api import create_app
from flexkv_store.store import open_store

TOKEN = "bench-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Served:
    def __init__(self, app: Any) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="error", access_log=False
            )
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _rate(url: str, method: str, path: str, seconds: float, body: bytes | None = None) -> float:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=headers) as client:
        for _ in range(20):  # warm up the connection and the handlers
            client.request(method, path, content=body)
        n = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            r = client.request(method, path, content=body)
            if r.status_code != 200:
                raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
            n += 1
    return n / elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else 3.0

    bare = FastAPI()

    @bare.get("/const")
    async def const() -> dict[str, Any]:
        return {"cache_salt": "alice", "limit_bytes": 1, "status": "ok"}

    @bare.put("/const")
    async def const_put() -> dict[str, Any]:
        return {"cache_salt": "alice", "limit_bytes": 1, "status": "ok"}

    with _Served(bare) as url:
        base_get = _rate(url, "GET", "/const", seconds)
        base_put = _rate(url, "PUT", "/const", seconds, b'{"limit_gb": 1}')

    store = open_store("memory://")
    with _Served(create_app(store, token=TOKEN)) as url:
        get_one = _rate(url, "GET", "/api/quota/alice", seconds)
        put_one = _rate(url, "PUT", "/api/quota/alice", seconds, b'{"limit_gb": 1}')
        listing = _rate(url, "GET", "/api/quota", seconds)
    return {
        "bench": "api",
        "machine": machine(),
        "baseline": "bare FastAPI route with a constant reply, same uvicorn and client loop",
        "get_quota": {
            "req_s": round(get_one),
            "baseline_req_s": round(base_get),
            "ratio": ratio(get_one, base_get),
        },
        "put_quota": {
            "req_s": round(put_one),
            "baseline_req_s": round(base_put),
            "ratio": ratio(put_one, base_put),
        },
        "list_quotas": {
            "req_s": round(listing),
            "baseline_req_s": round(base_get),
            "ratio": ratio(listing, base_get),
        },
    }


if __name__ == "__main__":
    emit(main())
