"""One hard quota across real processes: 4 workers over one fs directory with the sqlite
accounting, and over one Redis (standalone and the 3-node Cluster) with the Redis
accounting; a fifth process sampling the shared usage; a worker killed mid-write."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from flexkv_store.keyformat import ObjectKey
from flexkv_store.store import Store, open_store

HERE = Path(__file__).resolve().parent
QUOTAS = {"alice": 600 * 1024, "bob": 300 * 1024, "carol": 150 * 1024}

REDIS_SAMPLER = textwrap.dedent(
    """
    import json, os, sys, time
    import redis
    from redis.cluster import RedisCluster
    url, prefix, quotas, stop = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    if url.startswith("redis+cluster://"):
        host, port = url[len("redis+cluster://"):].split(",")[0].rsplit(":", 1)
        r = RedisCluster(host=host, port=int(port))
    else:
        r = redis.Redis.from_url(url)
    worst, samples = {}, 0
    while not os.path.exists(stop):
        for salt, quota in quotas.items():
            used = r.hget(f"{prefix}acct:{{s:{salt.encode().hex()}}}:st", "used")
            if used is not None:
                worst[salt] = max(worst.get(salt, 0), int(used) / quota)
        samples += 1
        time.sleep(0.005)
    print(json.dumps({"samples": samples, "worst": worst}))
    """
)

SAMPLER = textwrap.dedent(
    """
    import json, sqlite3, sys, time
    path, quotas, stop = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    import os
    worst, samples = {}, 0
    while not os.path.exists(path):
        time.sleep(0.01)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    while not os.path.exists(stop):
        try:
            rows = db.execute("SELECT salt, used FROM salts").fetchall()
        except sqlite3.OperationalError:  # the first process is still creating the schema
            time.sleep(0.01)
            continue
        for salt, used in rows:
            if salt in quotas:
                worst[salt] = max(worst.get(salt, 0), used / quotas[salt])
        samples += 1
        time.sleep(0.005)
    print(json.dumps({"samples": samples, "worst": worst}))
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def _worker(config: dict[str, Any], seed: int, ops: int) -> subprocess.Popen[str]:
    args = [sys.executable, str(HERE / "shared_worker.py"), json.dumps(config), str(seed), str(ops)]
    args += [f"{s}={q}" for s, q in QUOTAS.items()]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )


async def _scan_usage(store: Store) -> dict[str, int]:
    usage: dict[str, int] = {}
    async for info in store.scan():
        usage[info.key.cache_salt] = usage.get(info.key.cache_salt, 0) + info.size
    return usage


def _config(tmp_path: Path) -> dict[str, Any]:
    return {
        "backend": f"fs://{tmp_path / 'kv'}",
        "quota": {"accounting": "sqlite", "quotas": QUOTAS},
    }


#: A worker takes a few seconds; one that takes this long is stuck.
WORKER_TIMEOUT_S = 180


def _finish(w: subprocess.Popen[str]) -> tuple[str, str]:
    """A worker's output; if it is stuck, fail with where its tasks wait (it dumps them
    on SIGUSR1) instead of waiting on."""
    try:
        return w.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        w.send_signal(signal.SIGUSR1)
        time.sleep(2)
        w.kill()
        _, err = w.communicate()
        pytest.fail(f"a worker was stuck after {WORKER_TIMEOUT_S} s; its tasks:\n{err[-6000:]}")


@pytest.mark.parametrize("kind", ["sqlite", "redis", "redis-cluster"])
def test_four_processes_share_one_hard_quota(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    stop = tmp_path / "stop"
    if kind == "sqlite":
        config = _config(tmp_path)
        db = tmp_path / "kv" / "flexkv-accounting.sqlite"
        cmd = [sys.executable, "-c", SAMPLER, str(db), json.dumps(QUOTAS), str(stop)]
    else:
        from servers import unique_prefix

        server = request.getfixturevalue(
            "redis_cluster" if kind == "redis-cluster" else "redis_server"
        )
        prefix = unique_prefix()
        backend: dict[str, Any] = {"type": "redis", "key_prefix": prefix}
        if kind == "redis-cluster":
            backend |= {"cluster": True, "nodes": server.startup_nodes}
        else:
            backend["url"] = server.url
        config = {"backend": backend, "quota": {"accounting": "redis", "quotas": QUOTAS}}
        cmd = [
            sys.executable,
            "-c",
            REDIS_SAMPLER,
            server.url,
            prefix,
            json.dumps(QUOTAS),
            str(stop),
        ]
    sampler = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    workers = [_worker(config, seed, 500) for seed in range(4)]
    results = []
    for w in workers:
        out, err = _finish(w)
        assert w.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    stop.touch()
    sampled = json.loads(sampler.communicate(timeout=60)[0])
    assert sum(r["puts"] for r in results) > 2000
    assert sampled["samples"] > 10
    # the shared usage never exceeded a quota, at any sampled moment
    assert all(ratio <= 1.0 for ratio in sampled["worst"].values()), sampled
    assert set(sampled["worst"]) == set(QUOTAS)
    assert min(sampled["worst"].values()) > 0.5  # the quotas were under pressure

    async def check() -> None:
        async with open_store(config) as store:
            acct = store.accounting
            found = await _scan_usage(store)
            for salt, quota in QUOTAS.items():
                used = await acct.usage(salt)
                assert used.nbytes == found.get(salt, 0), salt
                assert used.nbytes <= quota
            assert await acct.pending() == []

    asyncio.run(check())


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_worker_killed_mid_write_is_reconciled_without_losing_objects(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        config = _config(tmp_path)
    else:
        from servers import unique_prefix

        server = request.getfixturevalue("redis_server")
        backend = {"type": "redis", "url": server.url, "key_prefix": unique_prefix()}
        config = {"backend": backend, "quota": {"accounting": "redis", "quotas": QUOTAS}}
    w = _worker(config, 7, 100_000)

    async def stored() -> int:
        async with open_store({**config, "quota": {}}) as probe:  # local: reads no state
            return sum([1 async for _ in probe.scan()])

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and asyncio.run(stored()) < 5:
        time.sleep(0.2)
    time.sleep(0.3)
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=30)

    async def check() -> None:
        reconciled = {**config, "quota": {**config["quota"], "reconcile": True}}
        async with open_store(reconciled) as store:
            acct = store.accounting
            assert await acct.pending() == []  # the dead writer's admissions are settled
            found: dict[Any, int] = {}
            async for info in store.scan():
                found[info.key] = info.size
            accounted = dict(await acct.lru_order())
            assert accounted == found  # every object accounted, nothing phantom
            for salt, quota in QUOTAS.items():
                assert (await acct.usage(salt)).nbytes <= quota

    asyncio.run(check())


def test_fsck_reconciles_a_killed_writers_admissions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from flexkv_store.cli import main

    config = _config(tmp_path)
    path = tmp_path / "flexkv.yaml"
    path.write_text(yaml.safe_dump(config))
    w = _worker(config, 11, 100_000)
    db = tmp_path / "kv" / "flexkv-accounting.sqlite"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        db.exists() and any((tmp_path / "kv").rglob("*.data"))
    ):
        time.sleep(0.2)
    time.sleep(0.5)
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=30)
    assert main(["fsck", "--config", str(path), "--json"]) in (0, 1)
    report = json.loads(capsys.readouterr().out)[-1]["accounting"]
    assert report["where"].startswith("sqlite:")
    assert main(["fsck", "--config", str(path), "--repair", "--json"]) == 0
    repaired = json.loads(capsys.readouterr().out)[-1]["accounting"]
    assert repaired["pending"] == 0 and repaired["unaccounted"] == 0
    # du shows the accounting's usage per salt beside the scan's: now equal
    assert main(["du", "--config", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    scanned: dict[str, int] = {}
    for r in rows:
        if r["backend"] != "accounting":
            scanned[r["cache_salt"]] = scanned.get(r["cache_salt"], 0) + r["bytes"]
    accounted = {r["cache_salt"]: r["bytes"] for r in rows if r["backend"] == "accounting"}
    assert accounted == scanned and accounted

    async def check() -> None:
        async with open_store(config) as store:  # no reconcile on open: fsck did it
            found = {i.key: i.size async for i in store.scan()}
            assert dict(await store.accounting.lru_order()) == found

    asyncio.run(check())


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_lost_objects_are_forgotten_but_never_a_write_in_flight(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A shared accounting forgets an object every backend lost (a read that misses), but
    not one another process admitted and is still writing."""
    from flexkv_store.keyformat import ObjectKey

    if kind == "sqlite":
        config = _config(tmp_path)
    else:
        from servers import unique_prefix

        server = request.getfixturevalue("redis_server")
        config = {
            "backend": f"fs://{tmp_path / 'kv'}",
            "quota": {"accounting": f"{server.url}?key_prefix={unique_prefix()}", "quotas": QUOTAS},
        }

    async def go() -> None:
        lost = ObjectKey("m", 0, b"\x01", "alice")
        busy = ObjectKey("m", 0, b"\x02", "alice")
        async with open_store(config) as a, open_store(config) as b:
            await a.put_many([(lost, b"x" * 100), (busy, b"y" * 100)])
            for key in (lost, busy):
                await a.backends[0].delete(key)  # lost behind the store's back
            # another process starts writing `busy` again: admitted, not written yet
            pending = await b.accounting.admit([(busy, 100)], each=False)
            assert await a.get_into(lost, bytearray(200)) is None
            assert await a.get_into(busy, bytearray(200)) is None
            await a.wait_idle()
            assert await a.accounting.contains([lost, busy]) == [False, True]
            await b.accounting.commit(pending.admissions)
            assert (await a.accounting.usage("alice")).nbytes == 100

    asyncio.run(go())


def test_fsck_repair_keeps_adopted_objects_within_the_quota(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Objects stored past the shared accounting (here by a store with the local one) are
    adopted as the least recently used; what does not fit its quota is deleted, as an
    eviction would, so the accounting never reads over quota and nothing stays stored but
    not accounted."""
    import yaml

    from flexkv_store.cli import main

    config = _config(tmp_path)
    path = tmp_path / "flexkv.yaml"
    path.write_text(yaml.safe_dump(config))
    keys = [ObjectKey("m", 0, bytes([i]), "carol") for i in range(5)]

    async def setup() -> None:
        async with open_store(config) as store:  # the shared state exists, and knows:
            await store.put(keys[0], b"x" * (50 * 1024))
        async with open_store({**config, "quota": {}}) as bypass:  # ...not these
            for key in keys[1:]:
                await bypass.put(key, b"y" * (50 * 1024))
                await asyncio.sleep(0.01)  # scan order = write order

    asyncio.run(setup())
    assert main(["fsck", "--config", str(path), "--repair", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[-1]["accounting"]
    # carol's quota is 150 KiB: k0 (accounted) stays with the two newest found
    assert report["evicted"] == 2 and report["unaccounted"] == 0

    async def check() -> None:
        async with open_store(config) as store:
            found = {i.key async for i in store.scan()}
            assert found == {keys[0], keys[3], keys[4]}
            assert dict(await store.accounting.lru_order("carol")).keys() == found
            assert (await store.accounting.usage("carol")).nbytes == 150 * 1024

    asyncio.run(check())
