"""Faults: a Redis server killed and restarted mid-workload, an S3 endpoint that throttles,
drops connections and cuts bodies short, and endpoints that never answer.

The invariants: a failing operation raises BackendUnavailableError within a bounded time
(a correctness bound for "bounded", generous on purpose, not a performance figure);
operations succeed again once the server is back; and no successful read ever returns
anything but a value that was put for that key (or None).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from servers import MotoServer, RedisServer, free_port, start_or_skip, start_redis, unique_prefix

from flexkv_store.backends import RedisConfig, S3Config
from flexkv_store.backends._redis import RedisAdapter
from flexkv_store.backends._s3 import S3Adapter
from flexkv_store.backends.base import L2Adapter
from flexkv_store.errors import BackendUnavailableError
from flexkv_store.keyformat import ObjectKey

SOCKET_TIMEOUT = 1.0
#: "Bounded": a failing call must give up within this many seconds.
FAIL_BOUND = 3 * SOCKET_TIMEOUT


def _key(i: int) -> ObjectKey:
    return ObjectKey("fault/model", 0, i.to_bytes(2, "big"))


class Checker:
    """What a read may return: any value put (or attempted) for the key since, or None."""

    def __init__(self) -> None:
        self.allowed: dict[ObjectKey, set[bytes]] = {}
        self.failures: list[float] = []
        self.successes = 0

    async def op(self, adapter: L2Adapter, rng: random.Random, n_keys: int) -> None:
        key = _key(rng.randrange(n_keys))
        start = time.monotonic()
        try:
            if rng.random() < 0.5:
                value = rng.randbytes(rng.choice([10, 5000, 300_000]))
                # Allowed from the moment it is sent: a concurrent reader may see it before
                # the put returns, and a failed put may have landed all the same.
                self.allowed.setdefault(key, set()).add(value)
                await adapter.put(key, value)
            else:
                got = await adapter.get(key)
                assert got is None or got in self.allowed.get(key, set()), "read a wrong value"
            self.successes += 1
        except BackendUnavailableError:
            elapsed = time.monotonic() - start
            assert elapsed < FAIL_BOUND, f"failing call took {elapsed:.2f} s"
            self.failures.append(elapsed)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test kills and restarts."""
    server = start_or_skip("redis-server", lambda: start_redis(tmp_path, unix_socket=False))
    try:
        yield server
    finally:
        server.stop()


async def test_redis_killed_and_restarted(own_redis: RedisServer) -> None:
    cfg = RedisConfig(port=own_redis.port, socket_timeout=SOCKET_TIMEOUT, key_prefix="f/")
    checker = Checker()
    rng = random.Random(7)
    async with RedisAdapter(cfg) as adapter:
        for _ in range(40):
            await checker.op(adapter, rng, 8)
        assert not checker.failures

        own_redis.kill()
        for _ in range(5):
            await checker.op(adapter, rng, 8)
        assert len(checker.failures) == 5, "every call during the outage must fail"

        # Back on the same port with no data: calls reconnect and succeed, reads miss.
        await asyncio.to_thread(own_redis.restart)
        before = checker.successes
        for _ in range(40):
            await checker.op(adapter, rng, 8)
        assert checker.successes == before + 40
        assert len(checker.failures) == 5


async def test_redis_outages_under_concurrent_load(own_redis: RedisServer) -> None:
    """Workers run while the server is killed and restarted twice under them."""
    cfg = RedisConfig(port=own_redis.port, socket_timeout=SOCKET_TIMEOUT, key_prefix="g/")
    checker = Checker()
    stop = asyncio.Event()

    async def worker(seed: int, adapter: L2Adapter) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            await checker.op(adapter, rng, 16)
            await asyncio.sleep(0)

    async with RedisAdapter(cfg) as adapter:
        workers = [asyncio.create_task(worker(i, adapter)) for i in range(4)]
        try:
            for down, up in ((0.3, 0.4), (0.2, 0.2)):
                await asyncio.sleep(up)
                own_redis.kill()
                await asyncio.sleep(down)
                await asyncio.to_thread(own_redis.restart)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert checker.failures, "the outages should have failed some calls"
        assert checker.successes > 50
        # Once the server is back, everything works.
        for i in range(10):
            await adapter.put(_key(i), b"after")
        assert await adapter.get_many([_key(i) for i in range(10)]) == [b"after"] * 10


# -- S3 ----------------------------------------------------------------------------------------


class FaultyProxy:
    """An HTTP proxy in front of moto that fails a share of requests.

    ``slowdown``: answer 503 SlowDown; ``drop``: close the connection without answering;
    ``cut``: forward, but cut a GET's body short and close. ``always_503`` fails
    everything. Decisions come from a seeded RNG, so a sequential test is repeatable.
    """

    def __init__(
        self,
        target_port: int,
        *,
        slowdown: float = 0.0,
        drop: float = 0.0,
        cut: float = 0.0,
        always_503: bool = False,
        seed: int = 1,
    ) -> None:
        self.target_port = target_port
        self.rates = (slowdown, drop, cut)
        self.always_503 = always_503
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults = {"slowdown": 0, "drop": 0, "cut": 0, "ok": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._decide()
                if fault == "slowdown":
                    msg = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if fault == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.end_headers()
                if fault == "cut" and self.command == "GET" and len(data) > 100:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _decide(self) -> str:
        with self.lock:
            if self.always_503:
                fault = "slowdown"
            else:
                x = self.rng.random()
                slowdown, drop, cut = self.rates
                if x < slowdown:
                    fault = "slowdown"
                elif x < slowdown + drop:
                    fault = "drop"
                elif x < slowdown + drop + cut:
                    fault = "cut"
                else:
                    fault = "ok"
            self.faults[fault] += 1
            return fault

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fault_bucket(moto_server: MotoServer) -> str:
    bucket = "flexkv-faults"
    boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=bucket)
    return bucket


def _s3_config(endpoint_url: str, bucket: str, **overrides: Any) -> S3Config:
    fields: dict[str, Any] = {
        "bucket": bucket,
        "prefix": unique_prefix(),
        "endpoint_url": endpoint_url,
        "region": "us-east-1",
        "addressing_style": "path",
        "access_key_id": "test",
        "secret_access_key": "test",
        "max_concurrency": 4,
        "connect_timeout": 1.0,
        "read_timeout": 5.0,
    }
    fields.update(overrides)
    return S3Config(**fields)


async def test_s3_retries_throttling_drops_and_cut_bodies(
    moto_server: MotoServer, fault_bucket: str
) -> None:
    proxy = FaultyProxy(moto_server.port, slowdown=0.15, drop=0.1, cut=0.1)
    try:
        cfg = _s3_config(proxy.endpoint_url, fault_bucket, max_attempts=12)
        async with S3Adapter(cfg) as a:
            data = {_key(i): bytes([i]) * (1000 + 50_000 * i) for i in range(12)}
            for k, v in data.items():
                await a.put(k, v)
            for k, v in data.items():
                assert await a.get(k) == v
                assert await a.size(k) == len(v)
            # Batches retry request by request, in parallel.
            await a.put_many((k, v[::-1]) for k, v in data.items())
            assert await a.get_many(list(data)) == [v[::-1] for v in data.values()]
            assert {i.key async for i in a.scan()} == set(data)
            assert await a.delete_many(list(data)) == [True] * len(data)
            assert a.retries > 0
        assert all(proxy.faults[f] > 0 for f in ("slowdown", "drop", "cut")), proxy.faults
    finally:
        proxy.close()


async def test_s3_always_throttled_is_unavailable(
    moto_server: MotoServer, fault_bucket: str
) -> None:
    proxy = FaultyProxy(moto_server.port, always_503=True)
    try:
        cfg = _s3_config(proxy.endpoint_url, fault_bucket, max_attempts=3)
        async with S3Adapter(cfg) as a:
            start = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                await a.put(_key(1), b"x")
            with pytest.raises(BackendUnavailableError):
                await a.get(_key(1))
            with pytest.raises(BackendUnavailableError):
                [i async for i in a.scan()]
            assert time.monotonic() - start < 3 * FAIL_BOUND
        assert proxy.faults["slowdown"] == 9, "3 attempts per call, then give up"
    finally:
        proxy.close()


async def test_s3_closed_port_is_unavailable(fault_bucket: str) -> None:
    cfg = _s3_config(f"http://127.0.0.1:{free_port()}", fault_bucket, max_attempts=3)
    async with S3Adapter(cfg) as a:
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await a.get(_key(2))
        with pytest.raises(BackendUnavailableError):
            await a.put_many([(_key(3), b"a"), (_key(4), b"b")])
        assert time.monotonic() - start < 2 * FAIL_BOUND
