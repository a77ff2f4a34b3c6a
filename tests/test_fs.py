"""The fs adapter: the conformance suite on every engine/O_DIRECT combination, plus what is
specific to files (layouts, LMCache file names, raw format, temp-file cleanup, ENOSPC,
the io_uring fallback)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from flexkv_store.backends import _fs, _uring
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends._io import WRITE, IoOp
from flexkv_store.backends.base import L2Adapter
from flexkv_store.backends.config import FsConfig
from flexkv_store.backends.testing import AdapterTests
from flexkv_store.errors import (
    BackendUnavailableError,
    BufferTooSmallError,
    InvalidKeyError,
    StorageError,
)
from flexkv_store.keyformat import ObjectKey

MIB = 1 << 20


def _uring_works() -> bool:
    try:
        _uring.load()
    except _uring.UringUnavailable:
        return False
    return True


needs_uring = pytest.mark.skipif(not _uring_works(), reason="io_uring engine unavailable here")


def _vectors() -> dict[str, Any]:
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "shared" / "vectors", here.parent / "vectors"):
        path = base / "keyformat.json"
        if path.exists():
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return data
    pytest.skip("keyformat.json vectors not found")


def _vector_keys() -> list[tuple[ObjectKey, str]]:
    return [
        (
            ObjectKey(
                v["model_name"], v["kv_rank"], bytes.fromhex(v["chunk_hash_hex"]), v["cache_salt"]
            ),
            v["filename"],
        )
        for v in _vectors()["valid"]
    ]


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _temp_files(root: Path) -> list[Path]:
    return [p for p in _all_files(root) if p.name.startswith(".tmp-")]


def _read(path: Path | str) -> bytes:
    return Path(path).read_bytes()


def _read_or_none(path: Path | str) -> bytes | None:
    try:
        return _read(path)
    except FileNotFoundError:
        return None


def _write(path: Path | str, data: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _open(path: Path | str, **kw: Any) -> FsAdapter:
    return FsAdapter(FsConfig(path=str(path), **kw))


async def _scan(adapter: L2Adapter, **kw: Any) -> dict[ObjectKey, int]:
    return {i.key: i.size async for i in adapter.scan(**kw)}


# -- the conformance suite ------------------------------------------------------------------


class _FsSuite(AdapterTests):
    options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def adapter_factory(self, tmp_path: Path) -> Callable[[], Awaitable[L2Adapter]]:
        counter = itertools.count()

        async def make() -> L2Adapter:
            base = tmp_path / f"fs{next(counter)}"
            paths = ";".join(str(base / d) for d in self.options.get("dirs", ["d"]))
            opts = {k: v for k, v in self.options.items() if k != "dirs"}
            return FsAdapter(FsConfig(path=paths, **opts))

        return make

    async def backdoor_read(self, adapter: L2Adapter, key: ObjectKey) -> bytes | None:
        assert isinstance(adapter, FsAdapter)
        return _read_or_none(adapter.object_path(key))

    async def backdoor_write(self, adapter: L2Adapter, key: ObjectKey, raw: bytes) -> None:
        assert isinstance(adapter, FsAdapter)
        _write(adapter.object_path(key), raw)


@needs_uring
class TestFsUring(_FsSuite):
    options: ClassVar[dict[str, Any]] = {"io_engine": "io_uring"}


@needs_uring
class TestFsUringDirect(_FsSuite):
    options: ClassVar[dict[str, Any]] = {
        "io_engine": "io_uring",
        "direct_io": True,
        "queue_depth": 8,
    }


class TestFsThreads(_FsSuite):
    options: ClassVar[dict[str, Any]] = {"io_engine": "threads"}


class TestFsThreadsDirect(_FsSuite):
    options: ClassVar[dict[str, Any]] = {"io_engine": "threads", "direct_io": True}


class TestFsFlatStriped(_FsSuite):
    """Flat layout over two directories, with the default engine choice."""

    options: ClassVar[dict[str, Any]] = {"layout": "flat", "dirs": ["a", "b"], "fsync": "data"}


# -- engine choice and info -------------------------------------------------------------------


@needs_uring
async def test_info_reports_engine_and_direct_io(tmp_path: Path) -> None:
    async with _open(tmp_path, direct_io=True, queue_depth=16) as a:
        info = a.info()
    assert info["io_engine"] == "io_uring"
    assert info["io_engine_requested"] == "auto"
    assert info["direct_io"] is True
    assert info["queue_depth"] == 16
    assert info["io_engine_note"] is None


async def test_fallback_to_threads_when_io_uring_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_build(*args: Any) -> Path:
        raise _uring.UringUnavailable("no compiler in this test")

    # A fresh loader state, an empty cache and a build that fails: what a bare machine sees.
    monkeypatch.setattr(_uring, "_loaded", None)
    monkeypatch.setattr(_uring, "_build", failing_build)
    monkeypatch.setenv("FLEXKV_STORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_fs, "_fallback_logged", False)
    with caplog.at_level("WARNING", logger="flexkv_store.backends._fs"):
        async with _open(tmp_path / "d") as a:
            await a.put(ObjectKey("m", 0, b"\x01"), b"data")
            assert await a.get(ObjectKey("m", 0, b"\x01")) == b"data"
            info = a.info()
        _open(tmp_path / "d2")  # a second adapter does not log again
    assert info["io_engine"] == "threads"
    assert "no compiler in this test" in info["io_engine_note"]
    assert [r.getMessage() for r in caplog.records].count(
        "fs adapter: io_uring engine unavailable, using the threads engine: "
        "no compiler in this test"
    ) == 1
    with pytest.raises(BackendUnavailableError, match="no compiler"):
        _open(tmp_path / "d3", io_engine="io_uring")


def test_loader_reports_missing_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_uring, "_loaded", None)
    monkeypatch.setenv("FLEXKV_STORE_CSRC", str(tmp_path / "nowhere"))
    with pytest.raises(_uring.UringUnavailable, match="C sources"):
        _uring.load()
    with pytest.raises(_uring.UringUnavailable):  # the failure is remembered
        _uring.load()


@needs_uring
def test_loader_builds_into_a_keyed_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_uring, "_loaded", None)
    monkeypatch.setenv("FLEXKV_STORE_CACHE_DIR", str(tmp_path))
    lib = _uring.load()
    assert lib.path.parent == tmp_path
    assert lib.path.name.startswith("_flexkv_uring_")
    # No half-built leftovers, and the object is reused by the next process.
    assert [p.name for p in tmp_path.iterdir()] == [lib.path.name]
    mtime = lib.path.stat().st_mtime_ns
    code = "from flexkv_store.backends import _uring; print(_uring.load().path)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "FLEXKV_STORE_CACHE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(lib.path)
    assert lib.path.stat().st_mtime_ns == mtime


# -- file names and layouts -------------------------------------------------------------------


async def test_flat_raw_reads_lmcache_files(tmp_path: Path) -> None:
    """Files named exactly as LMCache names them are found by get and scan (raw format)."""
    cases = _vector_keys()
    for i, (_, filename) in enumerate(cases):
        (tmp_path / filename).write_bytes(f"payload {i}".encode() * (i + 1))
    async with _open(tmp_path, layout="flat", format="raw") as a:
        assert a.capabilities.verifies_checksums is False
        found = await _scan(a)
        for i, (key, filename) in enumerate(cases):
            expected = f"payload {i}".encode() * (i + 1)
            if filename.startswith("h-"):
                # A raw file cannot say which long key it holds: neither found nor stored.
                assert key not in found
                assert await a.get(key) is None
                with pytest.raises(InvalidKeyError):
                    await a.put(key, b"x")
                continue
            assert found[key] == len(expected)
            assert await a.get(key) == expected
            assert await a.size(key) == len(expected)
    assert FsAdapter.capabilities.verifies_checksums is True  # the class default is untouched


async def test_flat_raw_writes_lmcache_files(tmp_path: Path) -> None:
    cases = [(k, f) for k, f in _vector_keys() if not f.startswith("h-")]
    async with _open(tmp_path, layout="flat", format="raw", direct_io=True) as a:
        await a.put_many((k, f.encode() * 3) for k, f in cases)
    for _, filename in cases:
        assert _read(tmp_path / filename) == filename.encode() * 3
    assert _names(tmp_path) == sorted(f for _, f in cases)


async def test_flat_framed_uses_the_same_names(tmp_path: Path) -> None:
    cases = _vector_keys()
    async with _open(tmp_path, layout="flat") as a:
        for i, (key, _) in enumerate(cases):
            await a.put(key, bytes([i]) * (100 + i))
    assert _names(tmp_path) == sorted(f for _, f in cases)
    for i, (_, filename) in enumerate(cases):
        assert os.stat(tmp_path / filename).st_size == 4096 + 100 + i
    async with _open(tmp_path, layout="flat") as a:
        assert await _scan(a) == {k: 100 + i for i, (k, _) in enumerate(cases)}


async def test_sharded_layout_and_striping(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    path = ";".join(map(str, dirs))
    keys = [ObjectKey("org/m", 0, i.to_bytes(4, "big"), "s") for i in range(60)]
    async with _open(path) as a:
        await a.put_many((k, k.chunk_hash * 10) for k in keys)
        for k in keys:
            rel = Path(a.object_path(k))
            assert rel.name == k.to_filename()
            # {root}/{aa}/{bb}/{filename}
            assert rel.parent.parent.parent in dirs
            assert len(rel.parent.name) == len(rel.parent.parent.name) == 2
    for d in dirs:  # every directory got a share
        assert len(_all_files(d)) > 5
    async with _open(path, io_engine="threads") as b:  # another process's view
        assert await b.get_many(keys) == [k.chunk_hash * 10 for k in keys]
        assert len(await _scan(b)) == len(keys)


async def test_scan_ignores_foreign_and_misplaced_files(tmp_path: Path) -> None:
    key = ObjectKey("m", 0, b"\x01")
    async with _open(tmp_path) as a:
        await a.put(key, b"data")
        good = Path(a.object_path(key))
        _write(good.parent / "notes.txt", b"not ours")
        _write(good.parent / "garbage@here.data", b"x" * 5000)
        _write(tmp_path / key.to_filename(), _read(good))  # a flat copy: the wrong place
        _write(good.parent / ".tmp-otherhost-1-abc.part", b"partial")
        assert await _scan(a) == {key: 4}


# -- get_into paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
@pytest.mark.parametrize("aligned", [True, False])
async def test_get_into_direct(tmp_path: Path, engine: str, aligned: bool) -> None:
    if engine == "io_uring" and not _uring_works():
        pytest.skip("io_uring engine unavailable here")
    sizes = [4096 * 3, 4096 * 3 + 100, 50, 0]
    arena = _aligned_array(1 << 16)
    out = arena[0 if aligned else 8 : 20008]
    src_arena = arena[32768:]  # aligned: written without a bounce copy
    async with _open(tmp_path, io_engine=engine, direct_io=True) as a:
        for n in sizes:
            key = ObjectKey("m", 0, n.to_bytes(4, "big"))
            data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
            src_arena[:n] = data
            await a.put(key, src_arena[:n])
            out[: n + 10] = 0xEE
            assert await a.get_into(key, out) == n
            assert out[:n].tobytes() == data.tobytes()
            assert (out[n : n + 10] == 0xEE).all()
            if n:
                with pytest.raises(BufferTooSmallError):
                    await a.get_into(key, out[: n - 1])


def _aligned_array(n: int) -> np.ndarray:
    raw = np.empty(n + 4096, dtype=np.uint8)
    start = -raw.ctypes.data % 4096
    return raw[start : start + n]


# -- corruption -------------------------------------------------------------------------------


async def test_corrupt_object_is_counted_and_removed(tmp_path: Path) -> None:
    key = ObjectKey("m", 0, b"\x02")
    async with _open(tmp_path) as a:
        await a.put(key, b"y" * 10000)
        path = Path(a.object_path(key))
        raw = bytearray(_read(path))
        raw[-1] ^= 0xFF
        _write(path, bytes(raw))
        assert await a.get(key) is None
        assert a.corrupt_objects == 1
        assert a.info()["corrupt_objects"] == 1
        assert _read_or_none(path) is None
        await a.put(key, b"y" * 10000)
        _write(path, _read(path)[:100])  # ours (our magic), truncated below the header size
        assert await a.size(key) is None
        assert a.corrupt_objects == 2
        assert _read_or_none(path) is None
        # Without our magic it is not ours: a miss, counted as foreign, and left alone.
        _write(path, b"short")
        assert await a.size(key) is None
        assert await a.get(key) is None
        assert await a.delete(key) is False
        assert (a.corrupt_objects, a.foreign_objects) == (2, 3)
        assert _read(path) == b"short"


# -- temp files and failures ------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid now names no process
    return proc.pid


async def test_stale_temp_files_are_removed_at_open(tmp_path: Path) -> None:
    host = _fs._HOST
    shard = tmp_path / "ab" / "cd"
    shard.mkdir(parents=True)
    dead = shard / f".tmp-{host}-{_dead_pid()}-0001.part"
    live = shard / f".tmp-{host}-{os.getpid()}-0002.part"
    old_live = tmp_path / f".tmp-{host}-{os.getpid()}-0003.part"
    remote = shard / ".tmp-otherhost-1-0004.part"
    old_remote = shard / ".tmp-otherhost-1-0005.part"
    for p in (dead, live, old_live, remote, old_remote):
        _write(p, b"partial")
    past = time.time() - FsAdapter.stale_temp_seconds - 60
    for p in (old_live, old_remote):
        os.utime(p, (past, past))
    async with _open(tmp_path):
        pass
    assert sorted(p.name for p in _temp_files(tmp_path)) == sorted([live.name, remote.name])


class _FullDiskEngine:
    """Wraps an engine: every write stores half its bytes, then fails with ENOSPC."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.batches = inner.batches

    def run(self, ops: Iterable[IoOp]) -> None:
        for op in ops:
            if op.kind != WRITE:
                self.inner.run([op])
                continue
            half = b"".join(bytes(b) for b in op.bufs)[: op.expect // 2]
            os.pwrite(op.fd, half, 0) if half and not _is_direct(op.fd) else None
            op.result = -errno.ENOSPC
            op.on_done(op)

    def close(self) -> None:
        self.inner.close()


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _fs._O_DIRECT)


@pytest.mark.parametrize("engine", ["io_uring", "threads"])
async def test_enospc_publishes_nothing(tmp_path: Path, engine: str) -> None:
    if engine == "io_uring" and not _uring_works():
        pytest.skip("io_uring engine unavailable here")
    old, new = ObjectKey("m", 0, b"\x01"), ObjectKey("m", 0, b"\x02")
    async with _open(tmp_path, io_engine=engine) as a:
        await a.put(old, b"old" * 1000)
        a._engine = _FullDiskEngine(a._engine)
        with pytest.raises(StorageError, match="no space left") as info:
            await a.put(new, b"n" * 100_000)
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC
        with pytest.raises(StorageError, match="no space left"):
            await a.put_many([(old, b"overwrite" * 1000), (new, b"new")])
        assert _temp_files(tmp_path) == []
        assert await a.get(new) is None
        assert await a.get(old) == b"old" * 1000, "a failed overwrite keeps the old object"
        assert await _scan(a) == {old: 3000}


async def test_other_os_errors_become_storage_errors(tmp_path: Path) -> None:
    key = ObjectKey("m", 0, b"\x03")
    async with _open(tmp_path, io_engine="threads") as a:
        await a.put(key, b"x")
        path = a.object_path(key)
        os.unlink(path)
        os.mkdir(path)  # a directory where the object should be: EISDIR on read
        with pytest.raises(StorageError) as info:
            await a.get(key)
        assert isinstance(info.value.__cause__, OSError)


async def test_closed_adapter_refuses_work(tmp_path: Path) -> None:
    a = _open(tmp_path)
    await a.aclose()
    await a.aclose()
    with pytest.raises(StorageError, match="closed"):
        await a.put(ObjectKey("m", 0, b"\x01"), b"x")


@pytest.mark.parametrize("policy", ["data", "always"])
async def test_fsync_policies(tmp_path: Path, policy: str) -> None:
    keys = [ObjectKey("m", 0, bytes([i])) for i in range(4)]
    async with _open(tmp_path, fsync=policy, direct_io=True) as a:
        await a.put_many((k, k.chunk_hash * 5000) for k in keys)
        assert await a.get_many(keys) == [k.chunk_hash * 5000 for k in keys]


@needs_uring
async def test_big_batch_beyond_queue_depth(tmp_path: Path) -> None:
    """More items than ring slots: the engine refills as completions arrive."""
    keys = [ObjectKey("m", 0, i.to_bytes(2, "big")) for i in range(50)]
    datas = [os.urandom(4096 * (i % 5) + i) for i in range(50)]
    async with _open(tmp_path, io_engine="io_uring", direct_io=True, queue_depth=4) as a:
        await a.put_many(zip(keys, datas, strict=True))
        assert await a.get_many(keys) == datas
        outs = await a.get_many([*keys[::-1], ObjectKey("m", 1, b"\x00")])
        assert outs == [*datas[::-1], None]


@needs_uring
def test_uring_engine_keeps_its_byte_budget_in_flight(tmp_path: Path) -> None:
    """A ring holds at most ``max_inflight_bytes`` in flight (one op always goes), and
    every op still completes, in any order, with the right bytes."""
    from flexkv_store.backends._io import READ, UringEngine

    path = tmp_path / "data"
    blob = os.urandom(40 * 4096)
    path.write_bytes(blob)
    engine = UringEngine(_uring.load(), 16)
    engine.max_inflight_bytes = 3 * 4096
    fd = os.open(path, os.O_RDONLY)
    outs = [bytearray(4096 * (1 + i % 2)) for i in range(20)]  # 1 or 2 pages each
    yielded = done = worst = 0
    offsets: list[int] = []

    def finished(op: IoOp) -> None:
        nonlocal done
        done += 1
        assert op.result == op.expect

    def ops() -> Iterator[IoOp]:
        nonlocal yielded, worst
        offset = 0
        for out in outs:
            # what was handed over and is not done: in flight, plus at most one waiting
            worst = max(worst, yielded - done)
            yielded += 1
            offsets.append(offset)
            yield IoOp(READ, fd, [memoryview(out)], offset, len(out), finished)
            offset += len(out)

    try:
        engine.run(ops())
    finally:
        os.close(fd)
        engine.close()
    assert done == len(outs)
    # 3 pages of budget: at most 2 ops in flight (1+2 or 2+1 pages), plus one waiting.
    assert worst <= 3
    for out, offset in zip(outs, offsets, strict=True):
        assert bytes(out) == blob[offset : offset + len(out)]
