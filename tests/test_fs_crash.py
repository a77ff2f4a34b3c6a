"""Crash safety of the fs adapter: a writer killed with SIGKILL in the middle of a batch.

A separate process overwrites a fixed set of keys batch after batch; each payload names its
key and version in its first 8 bytes and the rest follows from them, so a reader can tell
a complete object from a torn one. After the kill, a fresh adapter on the same directory
must find every key either absent or exactly one complete version, and its open must have
removed the dead writer's temp files.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexkv_store.backends import _uring
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends.config import FsConfig
from flexkv_store.keyformat import ObjectKey

REPO = Path(__file__).resolve().parents[1]
KEYS = 12

# The writer. With "stuck" it blocks forever in the publication of the 5th object of the second
# batch, so the kill surely lands mid-batch: some objects of that batch are published, the
# rest sit in temp files.
WRITER = """
import asyncio, os, sys, time
import numpy as np
from flexkv_store.backends import _fs
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends.config import FsConfig
from flexkv_store.keyformat import ObjectKey

path, engine, direct, mode, start = sys.argv[1:6]
KEYS = int(sys.argv[6])

def payload(i, v):
    n = 8 + 20000 * (1 + i % 4) + i * 37
    rng = np.random.default_rng(i * 1_000_003 + v)
    return i.to_bytes(4, "big") + v.to_bytes(4, "big") + rng.bytes(n - 8)

publishes = 0
said = False
if mode == "stuck":
    import threading
    lock = threading.Lock()
    real_publish = FsAdapter._publish
    def publish(self, *args):
        # Counted once done: every writer that comes after the 4th publication of batch 2
        # hangs, so at least 4 of that batch are surely on disk when the kill lands.
        global publishes
        global said
        with lock:
            stuck = publishes >= KEYS + 4
            if stuck and not said:
                said = True
                print("stuck", flush=True)
        if stuck:
            time.sleep(3600)
        real_publish(self, *args)
        with lock:
            publishes += 1
    FsAdapter._publish = publish

async def main():
    a = FsAdapter(FsConfig(path=path, io_engine=engine, direct_io=direct == "1", threads=4))
    v = int(start)
    while True:
        v += 1
        await a.put_many([(ObjectKey("org/m", 0, i.to_bytes(2, "big"), "s"), payload(i, v))
                          for i in range(KEYS)])
        if v == int(start) + 1:
            print("ready", flush=True)

asyncio.run(main())
"""


def _payload(i: int, v: int) -> bytes:
    n = 8 + 20000 * (1 + i % 4) + i * 37
    rng = np.random.default_rng(i * 1_000_003 + v)
    return i.to_bytes(4, "big") + v.to_bytes(4, "big") + rng.bytes(n - 8)


def _key(i: int) -> ObjectKey:
    return ObjectKey("org/m", 0, i.to_bytes(2, "big"), "s")


def _engines() -> list[str]:
    try:
        _uring.load()
    except _uring.UringUnavailable:
        return ["threads"]
    return ["io_uring", "threads"]


def _start_writer(
    path: Path, engine: str, direct: bool, mode: str, start: int
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [str(path), engine, "1" if direct else "0", mode, str(start), str(KEYS)]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _wait_for(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"writer said {line!r} instead of {word!r}; stderr:\n{err}")


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped, so its pid is dead to the temp-file cleanup
    if proc.stdout:
        proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*") if p.is_file()]


async def _check(path: Path, engine: str, direct: bool) -> dict[int, int]:
    """Every key is absent or one complete version; returns key -> version."""
    versions: dict[int, int] = {}
    config = FsConfig.model_validate({"path": str(path), "io_engine": engine, "direct_io": direct})
    async with FsAdapter(config) as a:
        assert _temp_files(path) == [], "opening must remove the dead writer's temp files"
        got = await a.get_many([_key(i) for i in range(KEYS)])
        for i, data in enumerate(got):
            if data is None:
                continue
            assert int.from_bytes(data[:4], "big") == i
            v = int.from_bytes(data[4:8], "big")
            assert data == _payload(i, v), f"key {i}: torn or mixed object"
            versions[i] = v
        assert a.corrupt_objects == 0
        sizes = {info.key: info.size async for info in a.scan()}
        assert sizes == {_key(i): len(_payload(i, v)) for i, v in versions.items()}
    return versions


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("engine", _engines())
async def test_kill_in_the_middle_of_a_batch(tmp_path: Path, engine: str, direct: bool) -> None:
    # Deterministic: blocked inside a rename, so the batch is half published.
    proc = _start_writer(tmp_path, engine, direct, "stuck", 0)
    _wait_for(proc, "ready")
    _wait_for(proc, "stuck")
    assert _temp_files(tmp_path), "the writer should be holding unpublished temp files"
    _kill(proc)
    versions = await asyncio.wait_for(_check(tmp_path, engine, direct), 30)
    # Batch 1 finished; of batch 2, the 4 objects renamed before the hang are published
    # (with the threads engine, other worker threads may publish a few more meanwhile),
    # the stuck one is not.
    assert len(versions) == KEYS
    assert set(versions.values()) == {1, 2}
    assert list(versions.values()).count(2) >= 4

    # Random: kills at arbitrary moments while batches overwrite the same keys.
    rnd = random.Random(1234)
    start = 10
    for _ in range(2):
        proc = _start_writer(tmp_path, engine, direct, "loop", start)
        _wait_for(proc, "ready")
        await asyncio.sleep(rnd.uniform(0.0, 0.05))
        _kill(proc)
        versions = await asyncio.wait_for(_check(tmp_path, engine, direct), 30)
        assert len(versions) == KEYS  # every key existed before and an overwrite never hides it
        start += 1000
