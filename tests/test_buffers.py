"""GIL-free copies into and out of ``bytes``, and the fs adapter's aligned scratch cache."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkv_store import _bytes
from flexkv_store._freelist import FreeLists
from flexkv_store.backends import _io


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 300_000), start=st.integers(0, 5000))
def test_bytes_of_copies_any_slice(size: int, start: int) -> None:
    src = os.urandom(size + start)
    view = memoryview(src)[start:]
    out = _bytes.bytes_of(view)
    assert type(out) is bytes
    assert out == src[start:]
    assert hash(out) == hash(src[start:])  # a normal, hashable bytes object


def test_bytes_of_is_a_copy_not_a_view() -> None:
    original = os.urandom(1 << 20)
    buf = bytearray(original)
    out = _bytes.bytes_of(memoryview(buf))
    buf[:] = bytes(len(buf))
    assert out == original


def test_large_copy_leaves_other_threads_running() -> None:
    """Another thread keeps getting the GIL while a 256 MiB copy runs."""
    src = np.ones(256 << 20, dtype=np.uint8)
    ticks = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0)

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.01)
        before = ticks
        start = time.perf_counter()
        out = _bytes.bytes_of(memoryview(src.data))
        took = time.perf_counter() - start
        during = ticks - before
    finally:
        stop.set()
        t.join()
    assert len(out) == src.nbytes and out[:4] == b"\x01" * 4 and out[-1:] == b"\x01"
    # With the GIL held throughout, the spinner would get at most a tick or two.
    assert during > 5, (during, took)


def test_copy_into() -> None:
    src = os.urandom(3 << 20)
    dst = bytearray(4 << 20)
    _bytes.copy_into(memoryview(dst), src)
    assert bytes(dst[: len(src)]) == src and not any(dst[len(src) :])


@pytest.fixture
def small_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "_cache", FreeLists(64 << 20))


@pytest.mark.usefixtures("small_cache")
def test_scratch_is_aligned_and_reused() -> None:
    a = _io.aligned_buffer(5000)
    assert a.size == 8192 and _io.address_of(a.view(a.size)) % _io.ALIGN == 0
    a.release()
    assert _io.aligned_buffer(6000) is a  # same size class, most recently released
    assert _io.aligned_buffer(6000) is not a


@pytest.mark.usefixtures("small_cache")
def test_scratch_cache_is_bounded_and_evicts_the_stalest_class() -> None:
    cache = _io._cache
    small = [_io.aligned_buffer(4 << 20) for _ in range(12)]  # 48 MiB
    for s in small:
        s.release()
    assert cache.bytes == 48 << 20
    big = [_io.aligned_buffer(20 << 20) for _ in range(2)]  # 40 MiB
    for b in big:
        b.release()
    # 88 MiB released into 64: small buffers (released earlier) were dropped, not big ones.
    assert cache.bytes <= 64 << 20
    assert cache.count(20 << 20) == 2 and cache.count(4 << 20) == 6
    huge = _io.aligned_buffer(65 << 20)
    huge.release()  # over the whole cap: never cached
    assert cache.count(65 << 20) == 0
    # Emptied classes do not break eviction.
    taken = [_io.aligned_buffer(20 << 20) for _ in range(2)]
    small_again = [_io.aligned_buffer(4 << 20) for _ in range(6)]
    assert cache.bytes == 0
    bigger = [_io.aligned_buffer(30 << 20) for _ in range(3)]
    for b in (*taken, *small_again, *bigger):
        b.release()  # 154 MiB released into 64
    assert cache.bytes == 60 << 20 and cache.count(30 << 20) == 2


def test_free_lists_are_safe_across_threads() -> None:
    lists: FreeLists[object] = FreeLists(1000)
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        try:
            for i in range(2000):
                size = 10 * (1 + (seed + i) % 7)
                item = lists.take(size) or object()
                lists.give(size, item)
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and 0 < lists.bytes <= 1000
    assert lists.bytes == sum(10 * k * lists.count(10 * k) for k in range(1, 8))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_worker_threads_run_nicer_than_their_creator() -> None:
    from flexkv_store import _threads

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice()
    with _threads.worker_pool(1, "flexkv-test") as pool:
        theirs = pool.submit(nice).result()
    assert theirs == min(19, mine + _threads.BACKGROUND_NICE)
    assert nice() == mine  # the caller's own priority is untouched


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_copies_and_reads_scratch_after_the_parent_used_them() -> None:
    """The shared copy threads and the scratch cache start afresh in a forked child (a
    lock held at the fork, or threads that are gone, would hang it)."""
    import asyncio
    import multiprocessing

    from flexkv_store import _threads

    async def use() -> bytes:
        src = os.urandom(2 << 20)
        out = await _threads.off_loop(_bytes.bytes_of, memoryview(src))
        assert out == src
        s = _io.aligned_buffer(1 << 20)
        s.release()
        return out[:4]

    asyncio.run(use())  # the parent has started its pool and filled the cache
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()

    def child() -> None:
        q.put(len(asyncio.run(use())))

    p = ctx.Process(target=child, daemon=True)
    p.start()
    p.join(30)
    if p.is_alive():
        p.kill()  # hung: fail, and leave nothing behind
    assert p.exitcode == 0 and q.get(timeout=1) == 4
