"""The ``flexkv-store`` command: help, config check, ls/du/fsck/bench on fs, Redis and S3,
serve (as a new user starts it) with the quota commands, and the demo."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
from servers import MotoServer, RedisServer, free_port, unique_prefix

from flexkv_store.backends import open_adapter
from flexkv_store.cli import main
from flexkv_store.keyformat import ObjectKey

CLI = [sys.executable, "-m", "flexkv_store.cli"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def populate(url: str) -> list[ObjectKey]:
    keys = [
        ObjectKey("org/model", 0, b"\x01", "alice"),
        ObjectKey("org/model", 0, b"\x02", "alice"),
        ObjectKey("org/model", 1, b"\x03", ""),
        ObjectKey("other", 0, b"\x04", "bob"),
    ]

    async def go() -> None:
        async with open_adapter(url) as a:
            await a.put_many([(k, bytes(100 * (i + 1))) for i, k in enumerate(keys)])

    asyncio.run(go())
    return keys


def test_help_shows_examples() -> None:
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True).stdout
    assert "examples:" in out
    for cmd in ("demo", "serve", "ls", "du", "fsck", "quota", "bench", "config"):
        assert cmd in out
        sub = subprocess.run([*CLI, cmd, "--help"], capture_output=True, text=True, check=True)
        assert "example:" in sub.stdout


def test_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("backend: redis://:hunter2@127.0.0.1:6379/0\nquota:\n  default_quota_gb: 1\n")
    code, data = run_json(capsys, "config", "check", "--config", str(good), "--json")
    assert code == 0
    assert data["config"]["backends"][0]["password"] == "**********"
    assert data["config"]["quota"]["default_quota_bytes"] == 1 << 30
    assert "hunter2" not in json.dumps(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("quota:\n  default_quota_bytes: -5\n")
    assert main(["config", "check", "--config", str(bad)]) == 2
    err = capsys.readouterr()
    assert "quota.default_quota_bytes" in err.out + err.err


def _urls(tmp_path: Path, redis_server: RedisServer, moto_server: MotoServer) -> dict[str, str]:
    bucket = "cli-tests"
    boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=bucket)
    s3 = (
        f"s3://{bucket}/{unique_prefix()}?endpoint_url={moto_server.endpoint_url}"
        "&region=us-east-1&access_key_id=test&secret_access_key=test&addressing_style=path"
    )
    return {
        "fs": f"fs://{tmp_path / 'fs'}",
        "redis": f"{redis_server.url}?key_prefix={unique_prefix()}",
        "s3": s3,
    }


@pytest.mark.parametrize("kind", ["fs", "redis", "s3"])
def test_ls_du_fsck_bench(
    kind: str,
    tmp_path: Path,
    redis_server: RedisServer,
    moto_server: MotoServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = _urls(tmp_path, redis_server, moto_server)[kind]
    keys = populate(url)
    code, rows = run_json(capsys, "ls", "--backend", url, "--json")
    assert code == 0
    assert {r["key"] for r in rows} == {k.to_wire() for k in keys}
    code, rows = run_json(capsys, "ls", "--backend", url, "--salt", "alice", "--json")
    assert {r["key"] for r in rows} == {k.to_wire() for k in keys if k.cache_salt == "alice"}
    code, du = run_json(capsys, "du", "--backend", url, "--json")
    assert code == 0
    by = {(r["model_name"], r["cache_salt"]): (r["objects"], r["bytes"]) for r in du}
    assert by == {("org/model", "alice"): (2, 300), ("org/model", "_default"): (1, 300),
                  ("other", "bob"): (1, 400)}  # fmt: skip
    code, report = run_json(capsys, "fsck", "--backend", url, "--json")
    assert code == 0
    assert report[0]["objects"] == 4
    assert report[0]["corrupt"] == []
    assert main(["ls", "--backend", url]) == 0  # the table form
    assert "org/model" in capsys.readouterr().out
    code, bench = run_json(capsys, "bench", "--backend", url, "--size-mib", "0.25",
                           "--count", "4", "--rounds", "1", "--json")  # fmt: skip
    assert code == 0
    assert bench[0]["put_gb_s"] > 0
    assert bench[0]["get_gb_s"] > 0


def test_fsck_finds_and_repairs_corruption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"fs://{tmp_path}?layout=flat&io_engine=threads"
    keys = populate(url)
    victim = tmp_path / keys[1].to_filename()
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    code, report = run_json(capsys, "fsck", "--backend", url, "--json")
    assert code == 1
    assert len(report[0]["corrupt"]) == 1
    assert victim.exists(), "fsck without --repair changes nothing"
    assert main(["fsck", "--backend", url, "--repair"]) == 0
    capsys.readouterr()
    assert not victim.exists()
    code, report = run_json(capsys, "fsck", "--backend", url, "--json")
    assert code == 0
    assert report[0]["objects"] == 3


def test_unreachable_backend_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?socket_timeout=0.5"
    assert main(["ls", "--backend", url]) == 3


# -- serve, as a new user starts it ----------------------------------------------------------


def _request(method: str, url: str, data: bytes | None = None, token: str | None = None) -> Any:
    # urllib, like curl -d, labels a body as form data; the API reads it as JSON anyway
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early with {proc.returncode}")
        try:
            _request("GET", url)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("serve did not answer in time")


def test_serve_and_quota_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    env = {**os.environ, "FLEXKV_STORE_ADMIN_TOKEN": "tok-123"}
    env.pop("FLEXKV_STORE_CONFIG", None)
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/health", proc)
        reply = _request("PUT", f"{base}/api/quota/alice", b'{"limit_gb": 1}', token="tok-123")
        assert reply["limit_bytes"] == 1 << 30
        with pytest.raises(urllib.error.HTTPError) as denied:
            _request("PUT", f"{base}/api/quota/alice", b'{"limit_gb": 2}')
        assert denied.value.code == 401
        assert _request("GET", f"{base}/api/quota")["users"]["alice"]["limit_gb"] == 1.0
        # the quota subcommands talk to the same server
        os.environ["FLEXKV_STORE_ADMIN_TOKEN"] = "tok-123"
        try:
            code, data = run_json(capsys, "quota", "set", "bob", "--bytes", "5000",
                                  "--url", base, "--json")  # fmt: skip
            assert code == 0
            assert data["limit_bytes"] == 5000
            code, data = run_json(capsys, "quota", "list", "--url", base, "--json")
            assert set(data["users"]) == {"alice", "bob"}
            code, data = run_json(capsys, "quota", "get", "bob", "--url", base, "--json")
            assert data["exists"] is True
            code, data = run_json(capsys, "quota", "delete", "bob", "--url", base, "--json")
            assert data["status"] == "removed"
            assert main(["quota", "set", "a@b", "--gb", "1", "--url", base]) == 1
            assert "cache_salt" in capsys.readouterr().err
        finally:
            del os.environ["FLEXKV_STORE_ADMIN_TOKEN"]
        assert (tmp_path / "flexkv-cache" / "flexkv-quota.json").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out.decode(errors="replace")
    assert main(["quota", "list", "--url", base]) == 3, "a stopped server is unreachable"


def test_serve_refuses_public_bind_without_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLEXKV_STORE_ADMIN_TOKEN"}
    res = subprocess.run(
        [*CLI, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "token" in res.stderr + res.stdout


# -- the demo --------------------------------------------------------------------------------


def test_demo_twice_shows_hits(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXKV_STORE_")}
    runs = []
    for _ in range(2):
        res = subprocess.run(
            [*CLI, "demo", "--requests", "3", "--json"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        runs.append(json.loads(res.stdout))
    first, second = runs
    for report in runs:
        for t in report["tenants"].values():
            assert t["mismatches"] == 0
            assert t["usage_bytes"] <= t["quota_bytes"]
    assert first["tenants"]["carol"]["evictions"] > 0, "carol exceeds her quota"
    assert sum(t["hits"] for t in second["tenants"].values()) > sum(
        t["hits"] for t in first["tenants"].values()
    )
    assert second["tenants"]["alice"]["hit_rate"] == 1.0
    assert (tmp_path / "flexkv-cache").is_dir()
