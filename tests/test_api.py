"""The admin HTTP API over a real socket: every route, auth, bad salts and bodies, schema."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings

from flexkv_store.keyformat import ObjectKey
from flexkv_store.quota import load_quotas
from flexkv_store.quota.api import create_app
from flexkv_store.store import Store, open_store

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """uvicorn on 127.0.0.1 in a thread; the store lives on the server's event loop."""

    def __init__(self, store: Store, token: str | None, *, local_need_token: bool = True) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(store, token=token, local_requests_need_token=local_need_token),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve())
        self.loop.run_until_complete(self.store.close())

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def on_loop(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine against the store on the server's loop (to check its state)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    store = open_store(
        {"backend": {"type": "fs", "path": str(tmp_path / "data"), "io_engine": "threads"}}
    )
    srv = Server(store, TOKEN)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def put_objects(server: Server, salt: str, sizes: list[int]) -> None:
    async def go() -> None:
        for i, n in enumerate(sizes):
            await server.store.put(ObjectKey("m", 0, i.to_bytes(4, "big"), salt), b"x" * n)

    server.on_loop(go())


def state_file(server: Server) -> Path:
    desc = server.store.info()["quota_state"]
    assert desc.startswith("json:")
    return Path(desc[5:])


@pytest.mark.parametrize("prefix", ["/api", ""])
def test_quota_lifecycle(client: httpx.Client, server: Server, prefix: str) -> None:
    assert client.get(f"{prefix}/quota").json() == {"users": {}}
    # curl -d sends form encoding; the body is JSON whatever the Content-Type says
    r = client.put(
        f"{prefix}/quota/alice",
        content=b'{"limit_gb": 1}',
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200
    assert r.json() == {
        "cache_salt": "alice",
        "limit_gb": 1.0,
        "limit_bytes": GIB,
        "status": "ok",
        "evicted_objects": 0,
        "evicted_bytes": 0,
    }
    assert server.store.quota.get_quota("alice") == GIB
    assert load_quotas(state_file(server)) == {"alice": GIB}
    put_objects(server, "alice", [100, 200])
    got = client.get(f"{prefix}/quota/alice").json()
    assert got == {
        "cache_salt": "alice",
        "limit_gb": 1.0,
        "limit_bytes": GIB,
        "current_usage_gb": 300 / GIB,
        "current_usage_bytes": 300,
        "objects": 2,
        "exists": True,
        "source": "runtime",
    }
    listing = client.get(f"{prefix}/quota").json()
    assert listing == {
        "users": {
            "alice": {
                "limit_gb": 1.0,
                "limit_bytes": GIB,
                "current_usage_gb": 300 / GIB,
                "current_usage_bytes": 300,
                "objects": 2,
            }
        }
    }
    # lowering a quota evicts at once, least recently used first
    r = client.put(f"{prefix}/quota/alice", json={"limit_bytes": 250}, headers=AUTH)
    assert r.json()["evicted_objects"] == 1
    assert r.json()["evicted_bytes"] == 100
    assert server.store.lru.usage("alice") == (200, 1)
    r = client.delete(f"{prefix}/quota/alice", headers=AUTH)
    assert r.json() == {"cache_salt": "alice", "status": "removed"}
    assert client.delete(f"{prefix}/quota/alice", headers=AUTH).json()["status"] == "not_found"
    assert server.store.quota.get_quota("alice") is None
    assert load_quotas(state_file(server)) == {}
    # still listed: it has usage
    assert client.get(f"{prefix}/quota").json()["users"]["alice"]["limit_bytes"] is None


def test_default_salt_and_dotdot(client: httpx.Client, server: Server) -> None:
    r = client.put("/api/quota/_default", json={"limit_bytes": 10}, headers=AUTH)
    assert r.status_code == 200
    assert r.json()["cache_salt"] == "_default"
    assert server.store.quota.get_quota("_default") == 10
    assert server.store.lru.get_quota("") == 10
    got = client.get("/api/quota/_default").json()
    assert got["cache_salt"] == "_default"
    assert got["exists"] is True
    # ".." is a valid salt; send it percent-encoded so no client normalizes the path
    r = client.put("/api/quota/%2E%2E", json={"limit_gb": 0.5}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert server.store.quota.get_quota("..") == GIB // 2


@pytest.mark.parametrize(
    "raw_salt",
    ["a%2Fb", "a/b", "s" * 200, "a%00b", "a%0Ab", "a@b", "a%5Cb", "%E2%80%8F"],
    ids=["slash-encoded", "slash", "200-chars", "nul", "newline", "at", "backslash", "bidi"],
)
def test_bad_salts_are_400(client: httpx.Client, server: Server, raw_salt: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        r = client.request(method, f"/api/quota/{raw_salt}", json={"limit_gb": 1}, headers=AUTH)
        assert r.status_code == 400, (method, r.status_code, r.text)
        body = r.json()
        assert body["field"] == "cache_salt"
        assert "cache_salt" in body["error"]
    assert server.store.quota.usage() == {}
    assert not state_file(server).exists() or load_quotas(state_file(server)) == {}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"limit_gb": NaN}', "body"),
        (b'{"limit_gb": Infinity}', "body"),
        (b'{"limit_gb": -1}', "limit_gb"),
        (b'{"limit_bytes": -1}', "limit_bytes"),
        (b'{"limit_gb": "1"}', "limit_gb"),
        (b'{"limit_gb": true}', "limit_gb"),
        (b'{"limit_gb": null}', "limit_gb"),
        (b'{"limit_bytes": 1.5}', "limit_bytes"),
        (b'{"limit_gb": 1, "limit_bytes": 5}', "body"),
        (b"{}", "body"),
        (b'{"limit": 1}', "body"),
        (b"[1]", "body"),
        (b"limit_gb=1", "body"),
        (b"", "body"),
        (b'{"limit_gb": 1e400}', "limit_gb"),
        (b'{"limit_bytes": 1e30}', "limit_bytes"),
        (b'{"limit_gb": 1e300}', "limit_gb"),
        (b"\xff\xfe", "body"),
    ],
)
def test_bad_bodies_are_400(client: httpx.Client, server: Server, body: bytes, field: str) -> None:
    r = client.put("/api/quota/alice", content=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
    assert server.store.quota.get_quota("alice") is None


def test_auth_on_mutating_routes(client: httpx.Client, server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = client.put("/api/quota/alice", json={"limit_gb": 1}, headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert client.delete("/quota/alice", headers=headers).status_code == 401
    assert server.store.quota.get_quota("alice") is None
    # reads need no token
    assert client.get("/api/quota").status_code == 200
    assert client.get("/health").status_code == 200


def test_usage_health_metrics_docs(client: httpx.Client, server: Server) -> None:
    client.put("/api/quota/bob", json={"limit_bytes": 1000}, headers=AUTH)
    put_objects(server, "bob", [400, 400, 400])
    put_objects(server, "", [7])
    usage = client.get("/api/usage").json()
    assert usage["total_bytes"] == 807
    assert usage["total_objects"] == 3
    assert usage["users"]["bob"]["evicted_objects"] == 1
    assert usage["users"]["_default"]["current_usage_bytes"] == 7
    assert usage["backends"][0]["adapter"] == "fs"
    for path in ("/health", "/api/health"):
        health = client.get(path).json()
        assert health["status"] == "ok"
    text = client.get("/metrics").text
    assert 'flexkv_store_usage_bytes{cache_salt="bob"} 800.0' in text
    assert 'flexkv_store_quota_bytes{cache_salt="bob"} 1000.0' in text
    assert 'flexkv_store_evictions_total{cache_salt="bob"} 1.0' in text
    assert "flexkv_store_operation_seconds_bucket" in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/api/quota/{cache_salt}" in spec["paths"]


def test_no_token_means_open(tmp_path: Path) -> None:
    store = open_store({"backend": "memory://"})
    srv = Server(store, None)
    srv.start()
    try:
        r = httpx.put(f"{srv.url}/api/quota/x", json={"limit_gb": 2}, timeout=10)
        assert r.status_code == 200
    finally:
        srv.stop()


# -- the OpenAPI schema, fuzzed: no 5xx ------------------------------------------------------


def test_schema_no_server_errors(server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14  # every route, with and without /api

    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call(headers=AUTH)
            assert response.status_code < 500, (case.method, case.path, response.text)
            content_type = " ".join(response.headers.get("content-type", []))
            if content_type.startswith("application/json"):
                json.loads(response.text)

        check()


def test_review_regressions(client: httpx.Client, server: Server) -> None:
    # integers too large for a float are a 400, not a 500
    for body in (b'{"limit_gb": ' + b"1" * 400 + b"}", b'{"limit_bytes": ' + b"9" * 400 + b"}"):
        r = client.put("/api/quota/a", content=body, headers=AUTH)
        assert r.status_code == 400, r.text
    # bytes that are not UTF-8 are not silently replaced
    for raw in ("%ff", "%C0%AF", "a%ED%A0%80"):
        r = client.put(f"/api/quota/{raw}", json={"limit_gb": 1}, headers=AUTH)
        assert r.status_code == 400, (raw, r.text)
        assert client.get(f"/api/quota/{raw}").status_code == 400
    assert server.store.quota.usage() == {}
    # a quota that cannot be saved is a 503, and what it evicted is still deleted
    put_objects(server, "b", [10, 10])
    state = state_file(server)
    if state.exists():
        state.unlink()
    state.mkdir()  # the rename onto it fails, for root too
    r = client.put("/api/quota/b", json={"limit_bytes": 10}, headers=AUTH)
    assert r.status_code == 503, r.text
    assert "not saved" in r.json()["error"]
    assert server.store.lru.usage("b") == (10, 1)

    async def on_disk() -> int:
        return len([i async for i in server.store.scan(cache_salt="b")])

    assert server.on_loop(on_disk()) == 1


@pytest.mark.parametrize("local_need_token", [True, False])
def test_loopback_clients_without_a_token(tmp_path: Path, local_need_token: bool) -> None:
    """admin.local_requests_need_token: false lets a client on 127.0.0.1 (a real socket)
    change quotas without the token, as LMCache's `lmcache quota` does; with or without
    the option, the token works, and a client from another address still needs it."""
    store = open_store({"backend": f"fs://{tmp_path / 'kv'}"})
    srv = Server(store, TOKEN, local_need_token=local_need_token)
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            r = c.put("/quota/alice", content=b'{"limit_gb": 1}')
            assert r.status_code == (401 if local_need_token else 200)
            assert (
                c.put("/quota/alice", content=b'{"limit_gb": 2}', headers=AUTH).status_code == 200
            )
            assert c.delete("/quota/alice").status_code == (401 if local_need_token else 200)
    finally:
        srv.stop()

    async def remote() -> int:
        app = create_app(open_store({"backend": "memory://"}), token=TOKEN,
                         local_requests_need_token=False)  # fmt: skip
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as c:
            r = await c.put("/quota/alice", content=b'{"limit_gb": 1}')
            return r.status_code

    assert asyncio.run(remote()) == 401
