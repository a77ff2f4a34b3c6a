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


@pytest.mark.parametrize("size", [0, 1, 4096, (64 << 10) - 1, 64 << 10, 3 << 20])
def test_copy_into(size: int) -> None:
    src = os.urandom(size)
    dst = bytearray(size + 4096)
    _bytes.copy_into(memoryview(dst), src)
    assert bytes(dst[:size]) == src and not any(dst[size:])


def test_copy_into_takes_any_format_and_checks_bounds() -> None:
    src = np.arange(1000, dtype=np.int32)  # 4000 bytes, format "i"
    dst = np.zeros(1000, dtype=np.float64)  # 8000 bytes, format "d"
    _bytes.copy_into(dst.data, src.data)
    assert dst.view(np.uint8)[:4000].tobytes() == src.tobytes()
    with pytest.raises(ValueError, match="dst: needs 5 writable bytes, has 4"):
        _bytes.copy_into(memoryview(bytearray(4)), b"12345")
    with pytest.raises(ValueError, match="read-only"):
        _bytes.copy_into(memoryview(b"abcd"), b"ab")


@pytest.mark.skipif(
    not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
    reason="needs a Linux kernel with transparent huge pages",
)
def test_advise_huge_on_a_mapping() -> None:
    import mmap

    mm = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        assert _bytes.advise_huge(mm) is (hasattr(mmap, "MADV_HUGEPAGE"))
        mm[:4] = b"abcd"  # still an ordinary mapping
        assert mm[:4] == b"abcd"
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # What the kernel was told shows in the mapping's flags ("hg").
            start = _bytes.address_of(mm)
            with open("/proc/self/smaps") as f:
                text = f.read()
            head = f"{start:x}-"
            section = text[text.index(head) :].split("VmFlags:", 1)[1].splitlines()[0]
            assert "hg" in section.split()
    finally:
        mm.close()


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_anonymous_mapping_lives_as_long_as_its_views() -> None:
    view = _bytes.map_anonymous(3 << 20, huge=True)
    assert view.format == "B" and view.nbytes == 3 << 20 and not view.readonly
    address = _bytes.address_of(view)
    assert address % 4096 == 0 and not any(view[:4096])  # fresh anonymous memory is zero
    view[:5] = b"hello"
    part = view[1:3]
    del view
    assert bytes(part) == b"el" and _mapped(address)  # a slice keeps the mapping
    del part
    assert not _mapped(address)  # unmapped with its last view
    with pytest.raises(ValueError, match="size: must be positive"):
        _bytes.map_anonymous(0)


def test_anonymous_mapping_without_libc_falls_back_to_mmap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_bytes, "_libc_mmap", None)
    view = _bytes.map_anonymous(1 << 20, huge=True)
    assert view.nbytes == 1 << 20 and not view.readonly
    assert _bytes.address_of(view) % 4096 == 0
    view[-3:] = b"end"
    assert bytes(view[-3:]) == b"end"


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


def _slice_ns() -> int | None:
    """The calling thread's time slice as the kernel reports it (None where it does not)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/sched") as f:
            for line in f:
                if line.startswith("se.slice"):
                    return int(line.split(":")[1].strip())
    except OSError:
        pass
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread slices are Linux's")
def test_worker_threads_ask_for_a_long_slice_and_keep_their_policy() -> None:
    from flexkv_store import _threads

    mine = _slice_ns()
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    if mine is None or _threads._SCHED_SETATTR is None or release < (6, 12):
        pytest.skip("the kernel sets no custom slices for normal threads before Linux 6.12")

    def probe() -> tuple[int | None, int, int | None]:
        tid = threading.get_native_id()
        # A thread the worker starts (an OpenMP team) inherits the slice.
        child: list[int | None] = []
        t = threading.Thread(target=lambda: child.append(_slice_ns()))
        t.start()
        t.join()
        return _slice_ns(), os.sched_getscheduler(tid), child[0]

    with _threads.worker_pool(1, "flexkv-test") as pool:
        theirs, policy, childs = pool.submit(probe).result()
    assert theirs == _threads.BACKGROUND_SLICE_NS
    assert childs == _threads.BACKGROUND_SLICE_NS
    assert policy == os.sched_getscheduler(0)
    assert _slice_ns() == mine  # the caller's own slice is untouched


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
