"""``check()`` (fsck): what it finds without side effects, and what ``repair`` removes.

The fs and gds adapters walk their directories themselves (headers, streamed checksums,
temp and foreign files); the memory adapter uses the ABC's default, built on scan and get.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flexkv_store.backends import _fs
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends._gds import GdsAdapter
from flexkv_store.backends._memory import MemoryAdapter
from flexkv_store.backends.config import FsConfig, GdsConfig
from flexkv_store.keyformat import ObjectKey

ADAPTERS = ["fs", "gds"]


def _open(kind: str, path: Path, **kw: Any) -> FsAdapter:
    if kind == "gds":
        return GdsAdapter(GdsConfig(path=str(path), **kw))
    return FsAdapter(FsConfig(path=str(path), **kw))


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime: what "changes nothing" means."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _flip(path: str, pos: int) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[pos] ^= 0x01
    Path(path).write_bytes(bytes(raw))


def _truncate(path: str, size: int) -> None:
    os.truncate(path, size)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _exists(path: str) -> bool:
    return Path(path).exists()


def _write(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)


def _key(i: int, salt: str = "") -> ObjectKey:
    return ObjectKey("org/model", 0, i.to_bytes(4, "big"), salt)


@pytest.mark.parametrize("kind", ADAPTERS)
async def test_check_reports_then_repairs(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks, so the 100 KB objects are verified across several reads.
    monkeypatch.setattr(_fs, "_CHECK_CHUNK", 16 << 10)
    good = {_key(i, "alice" if i % 2 else ""): bytes([i]) * (100_000 + i) for i in range(3)}
    long_key = ObjectKey("x/" * 200 + "m", 1, b"\xab" * 64)  # a hashed (h-...) filename
    good[long_key] = b"long" * 1000
    flipped, truncated, bad_header = _key(10), _key(11), _key(12)
    async with _open(kind, tmp_path) as a:
        await a.put_many(good.items())
        for k in (flipped, truncated, bad_header):
            await a.put(k, b"x" * 100_000)
        _flip(a.object_path(flipped), 4096 + 99_999)  # the payload's last byte
        _truncate(a.object_path(truncated), 4096 + 50_000)
        _flip(a.object_path(bad_header), 40)  # in the header: no key to trust
        shard = Path(a.object_path(next(iter(good)))).parent
        temp = shard / f".tmp-{_fs._HOST}-{_dead_pid()}-0001.part"
        _write(temp, b"partial")
        foreign = [shard / "notes.txt", tmp_path / "README", shard / "garbage@here.data"]
        for p in foreign:
            _write(p, b"not ours")
        # A valid object in a directory get() never reads: someone's copy, not ours.
        misplaced = tmp_path / flipped.to_filename()
        _write(misplaced, _read(a.object_path(next(iter(good)))))
        foreign.append(misplaced)

        before = _tree(tmp_path)
        report = await a.check()
        assert _tree(tmp_path) == before, "check() without repair changes nothing"
        assert report.objects == len(good) + 3
        assert report.bytes == sum(map(len, good.values())) + 100_000 + 50_000 + 100_000
        assert sorted(report.corrupt) == sorted(
            [flipped.to_wire(), truncated.to_wire(), a.object_path(bad_header)]
        )
        assert report.temp_files == [str(temp)]
        assert sorted(report.foreign) == sorted(map(str, foreign))
        assert report.removed == 0 and not report.ok

        repaired = await a.check(repair=True)
        assert sorted(repaired.corrupt) == sorted(report.corrupt)
        assert repaired.temp_files == [str(temp)]
        assert repaired.removed == 4
        assert not temp.exists()
        for k in (flipped, truncated, bad_header):
            assert not _exists(a.object_path(k))
        for p in foreign:
            assert p.read_bytes() in (b"not ours", before[str(misplaced)][0])
        assert await a.get_many(list(good)) == list(good.values())

        again = await a.check()
        assert again.ok
        assert (again.objects, again.corrupt, again.temp_files, again.removed) == (
            len(good),
            [],
            [],
            0,
        )
        assert sorted(again.foreign) == sorted(map(str, foreign))
        assert a.corrupt_objects == 0, "check() is not a read: the read counter is untouched"


@pytest.mark.parametrize("kind", ADAPTERS)
async def test_repair_spares_live_writers(tmp_path: Path, kind: str) -> None:
    """A live writer's fresh temp file is listed but kept; stale ones go."""
    host, me = _fs._HOST, os.getpid()
    async with _open(kind, tmp_path, layout="flat") as a:
        await a.put(_key(1), b"data")
        live = tmp_path / f".tmp-{host}-{me}-0001.part"
        remote = tmp_path / ".tmp-otherhost-1-0002.part"
        old_remote = tmp_path / ".tmp-otherhost-1-0003.part"
        for p in (live, remote, old_remote):
            _write(p, b"partial")
        past = time.time() - FsAdapter.stale_temp_seconds - 60
        os.utime(old_remote, (past, past))
        report = await a.check(repair=True)
        assert sorted(report.temp_files) == sorted(map(str, (live, remote, old_remote)))
        assert report.removed == 1
        assert live.exists() and remote.exists() and not old_remote.exists()
        assert report.objects == 1 and report.corrupt == []


async def test_check_raw_format_counts_and_sizes(tmp_path: Path) -> None:
    """Raw files carry no checksum: check counts and sizes them, and cannot call them bad."""
    async with _open("fs", tmp_path, layout="flat", format="raw") as a:
        await a.put(_key(1), b"a" * 10)
        await a.put(_key(2), b"b" * 5000)
        _flip(a.object_path(_key(2)), 7)
        (tmp_path / "h-0000.data").write_bytes(b"not a raw object name")
        report = await a.check()
        assert (report.objects, report.bytes, report.corrupt) == (2, 5010, [])
        assert report.foreign == [str(tmp_path / "h-0000.data")]


async def test_check_striped_roots(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    keys = [_key(i) for i in range(20)]
    async with FsAdapter(FsConfig(path=";".join(map(str, dirs)))) as a:
        await a.put_many((k, k.chunk_hash * 100) for k in keys)
        victim = keys[7]
        _flip(a.object_path(victim), 4096)
        report = await a.check(repair=True)
        assert report.objects == 20 and report.bytes == 20 * 400
        assert report.corrupt == [victim.to_wire()] and report.removed == 1
        assert (await a.check()).ok
        assert await a.get(victim) is None
        assert await a.get(keys[8]) == keys[8].chunk_hash * 100


async def test_memory_adapter_default_check() -> None:
    async with MemoryAdapter() as m:
        assert (await m.check()).objects == 0
        await m.put(_key(1), b"x" * 10)
        await m.put(_key(2, "bob"), b"y" * 32)
        report = await m.check(repair=True)
        assert (report.objects, report.bytes, report.removed) == (2, 42, 0)
        assert report.ok and report.corrupt == [] and report.foreign == []
        assert await m.get(_key(2, "bob")) == b"y" * 32


@pytest.mark.parametrize("layout", ["sharded", "flat"])
async def test_store_quota_state_is_not_foreign(tmp_path: Path, layout: str) -> None:
    from flexkv_store.store import open_store

    cfg = {"backend": {"type": "fs", "path": str(tmp_path), "layout": layout}}
    async with open_store(cfg) as store:
        await store.quota.set_quota("alice", 100)
        await store.put(ObjectKey("m", 0, b"\x01", "alice"), b"x" * 10)
    assert (tmp_path / "flexkv-quota.json").exists()
    (tmp_path / "notes.txt").write_text("someone else's file")
    adapter = FsAdapter(FsConfig(path=str(tmp_path), layout=layout))  # type: ignore[arg-type]
    try:
        report = await adapter.check()
    finally:
        await adapter.aclose()
    assert report.objects == 1
    assert report.foreign == [str(tmp_path / "notes.txt")]
