"""The gds adapter: the conformance suite on CPU, fs interchange, the device-tensor paths.

Without a GPU the device paths are still exercised: CPU tensors are routed down them (the
adapter's device test is monkeypatched), and the cuFile path runs against a small fake
``kvikio`` that does its I/O with preadv/pwritev. Tests marked ``gpu`` need CUDA (and
kvikio, where they say so) and skip without them.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from flexkv_store.backends import _gds, _uring
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends._gds import GdsAdapter, tensor_checksum
from flexkv_store.backends.base import L2Adapter
from flexkv_store.backends.config import FsConfig, GdsConfig
from flexkv_store.backends.testing import AdapterTests
from flexkv_store.errors import BackendUnavailableError, BufferTooSmallError
from flexkv_store.keyformat import ObjectKey, as_bytes_view, checksum

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
REPO = Path(__file__).resolve().parents[1]


def _uring_works() -> bool:
    try:
        _uring.load()
    except _uring.UringUnavailable:
        return False
    return True


def _gds_open(path: Path | str, **kw: Any) -> GdsAdapter:
    return GdsAdapter(GdsConfig(path=str(path), **kw))


def _fs_open(path: Path | str, **kw: Any) -> FsAdapter:
    return FsAdapter(FsConfig(path=str(path), **kw))


def _pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _read_or_none(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _write(path: str, raw: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(raw)


def _flip(path: str, pos: int) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[pos] ^= 0x01
    Path(path).write_bytes(bytes(raw))


# -- the conformance suite on CPU -------------------------------------------------------------


class _GdsSuite(AdapterTests):
    options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def adapter_factory(self, tmp_path: Path) -> Callable[[], Awaitable[L2Adapter]]:
        counter = itertools.count()

        async def make() -> L2Adapter:
            return _gds_open(tmp_path / f"gds{next(counter)}", **self.options)

        return make

    async def backdoor_read(self, adapter: L2Adapter, key: ObjectKey) -> bytes | None:
        assert isinstance(adapter, GdsAdapter)
        return _read_or_none(adapter.object_path(key))

    async def backdoor_write(self, adapter: L2Adapter, key: ObjectKey, raw: bytes) -> None:
        assert isinstance(adapter, GdsAdapter)
        _write(adapter.object_path(key), raw)


class TestGdsThreads(_GdsSuite):
    options: ClassVar[dict[str, Any]] = {"io_engine": "threads"}


@pytest.mark.skipif(not _uring_works(), reason="io_uring engine unavailable here")
class TestGdsUringDirect(_GdsSuite):
    options: ClassVar[dict[str, Any]] = {"io_engine": "io_uring", "direct_io": True}


# -- a fake kvikio, so the cuFile path runs on CPU -------------------------------------------


class _Done:
    def __init__(self, n: int) -> None:
        self._n = n

    def get(self) -> int:
        return self._n


class FakeCuFile:
    """kvikio.CuFile's surface over preadv/pwritev on CPU tensors; records every call."""

    calls: ClassVar[list[tuple[str, str, int, int]]] = []
    fail_open: ClassVar[str | None] = None

    def __init__(self, path: str, flags: str = "r") -> None:
        if FakeCuFile.fail_open:
            raise RuntimeError(FakeCuFile.fail_open)
        assert flags in ("r", "r+"), "the adapter never truncates through cuFile"
        self.path = path
        self._fd = os.open(path, os.O_RDWR if flags == "r+" else os.O_RDONLY)

    def _view(self, buf: torch.Tensor, size: int) -> memoryview:
        assert buf.dtype == torch.uint8 and buf.is_contiguous() and buf.numel() >= size
        return as_bytes_view(buf)[:size]

    def pread(self, buf: torch.Tensor, size: int, file_offset: int = 0) -> _Done:
        FakeCuFile.calls.append(("pread", self.path, size, file_offset))
        view, done = self._view(buf, size), 0
        while done < size:
            n = os.preadv(self._fd, [view[done:]], file_offset + done)
            if n == 0:
                break
            done += n
        return _Done(done)

    def pwrite(self, buf: torch.Tensor, size: int, file_offset: int = 0) -> _Done:
        FakeCuFile.calls.append(("pwrite", self.path, size, file_offset))
        view, done = self._view(buf, size), 0
        while done < size:
            done += os.pwritev(self._fd, [view[done:]], file_offset + done)
        return _Done(done)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FakeCuFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def as_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route CPU torch tensors down the adapter's CUDA-tensor paths."""
    monkeypatch.setattr(_gds, "_is_device", lambda data: isinstance(data, torch.Tensor))


@pytest.fixture
def fake_kvikio(monkeypatch: pytest.MonkeyPatch, as_device: None) -> Iterator[type[FakeCuFile]]:
    """A kvikio whose CuFile works on CPU tensors, and a torch that claims CUDA."""
    module = types.ModuleType("kvikio")
    module.CuFile = FakeCuFile  # type: ignore[attr-defined]
    module.defaults = types.SimpleNamespace(compat_mode=lambda: "CompatMode.ON")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvikio", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_gds, "_HASH_CHUNK", 64 << 10)  # several chunks per object
    FakeCuFile.calls = []
    FakeCuFile.fail_open = None
    yield FakeCuFile
    FakeCuFile.fail_open = None


class TestGdsFakeCuFile(_GdsSuite):
    """The whole suite with torch tensors going through the cuFile code path."""

    options: ClassVar[dict[str, Any]] = {"use_cufile": "true", "io_engine": "threads"}

    @pytest.fixture
    def adapter_factory(
        self, tmp_path: Path, fake_kvikio: type[FakeCuFile]
    ) -> Callable[[], Awaitable[L2Adapter]]:
        counter = itertools.count()

        async def make() -> L2Adapter:
            a = _gds_open(tmp_path / f"gds{next(counter)}", **self.options)
            assert a.info()["cufile"] is True
            return a

        return make


# -- import hygiene and cuFile resolution -----------------------------------------------------


def test_import_needs_neither_torch_nor_kvikio() -> None:
    code = (
        "import sys\n"
        "from flexkv_store.backends import _gds\n"
        "print(sorted(m for m in ('torch', 'kvikio') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_auto_without_kvikio_stages_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kvikio", None)  # an import of kvikio now fails
    a = _gds_open(tmp_path)
    info = a.info()
    assert info["adapter"] == "gds"
    assert info["cufile"] is False
    assert "kvikio" in info["cufile_note"]
    assert info["use_cufile"] == "auto"
    assert GdsAdapter.capabilities.device_buffers is True
    with pytest.raises(BackendUnavailableError, match="use_cufile=true"):
        _gds_open(tmp_path, use_cufile="true")
    off = _gds_open(tmp_path, use_cufile=False).info()
    assert off["cufile"] is False and "use_cufile=false" in off["cufile_note"]


def test_auto_without_cuda_stages(
    tmp_path: Path, fake_kvikio: type[FakeCuFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = _gds_open(tmp_path).info()
    assert info["cufile"] is False
    assert "CUDA is not available" in info["cufile_note"]


def test_auto_when_no_handle_opens(tmp_path: Path, fake_kvikio: type[FakeCuFile]) -> None:
    fake_kvikio.fail_open = "cuFileHandleRegister failed: GDS driver not loaded"
    info = _gds_open(tmp_path).info()
    assert info["cufile"] is False
    assert "GDS driver not loaded" in info["cufile_note"]
    assert list(tmp_path.iterdir()) == [], "the probe file is removed"
    with pytest.raises(BackendUnavailableError, match="GDS driver not loaded"):
        _gds_open(tmp_path, use_cufile="true")


async def test_cufile_in_use_with_kvikio(tmp_path: Path, fake_kvikio: type[FakeCuFile]) -> None:
    async with _gds_open(tmp_path) as a:
        info = a.info()
        assert info["cufile"] is True and info["cufile_note"] is None
        assert info["kvikio_compat_mode"] == "CompatMode.ON"


# -- the cuFile path (fake kvikio) ------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, (64 << 10) * 3 + 5])
async def test_cufile_path_round_trip(
    tmp_path: Path, fake_kvikio: type[FakeCuFile], size: int
) -> None:
    data = _pattern(size, size)
    key = ObjectKey("org/m", 0, size.to_bytes(4, "big"), "alice")
    async with _gds_open(tmp_path / "gds", use_cufile="true") as a:
        await a.put(key, _tensor(data))
        path = a.object_path(key)
        out = torch.full((size + 100,), 0xEE, dtype=torch.uint8)
        assert await a.get_into(key, out) == size
        assert out[:size].numpy().tobytes() == data
        assert (out[size:] == 0xEE).all(), "bytes past the object stay untouched"
    if size:
        # The payload went through cuFile, at the 4096-aligned offset after the header.
        assert ("pwrite", "/proc/self/fd/", size, 4096) in [
            (c[0], c[1].rstrip("0123456789"), c[2], c[3]) for c in fake_kvikio.calls
        ]
        assert any(c[0] == "pread" and c[2:] == (size, 4096) for c in fake_kvikio.calls)
    # Byte for byte what the fs adapter writes for the same payload.
    async with _fs_open(tmp_path / "fs") as f:
        await f.put(key, data)
        assert _read_or_none(f.object_path(key)) == _read_or_none(path)
    async with _fs_open(tmp_path / "gds") as f:
        assert await f.get(key) == data


@pytest.mark.parametrize("where", ["payload", "header", "truncated", "other_key"])
async def test_cufile_path_corrupt_is_a_miss(
    tmp_path: Path, fake_kvikio: type[FakeCuFile], where: str
) -> None:
    data = _pattern(200_000, 7)
    key, other = ObjectKey("m", 0, b"\x01"), ObjectKey("m", 0, b"\x02")
    async with _gds_open(tmp_path, use_cufile="true") as a:
        await a.put(key, _tensor(data))
        path = a.object_path(key)
        if where == "payload":
            _flip(path, 4096 + 150_000)
        elif where == "header":
            _flip(path, 30)
        elif where == "truncated":
            os.truncate(path, 4096 + 1000)
        else:
            await a.put(other, _tensor(data))
            os.replace(a.object_path(other), path)
        out = torch.zeros(len(data), dtype=torch.uint8)
        before = _read_or_none(path)
        assert await a.get_into(key, out) is None
        if where == "other_key":
            # Our framing, another key's header: not this name's object (DESIGN section 14).
            assert (a.corrupt_objects, a.foreign_objects) == (0, 1)
            assert _read_or_none(path) == before, "a foreign file is left exactly as it was"
            return
        assert a.corrupt_objects == 1
        assert _read_or_none(path) is None, "a corrupt object is removed, as on the fs path"
        assert await a.get_into(key, out) is None


async def test_cufile_path_too_small_and_misses(
    tmp_path: Path, fake_kvikio: type[FakeCuFile]
) -> None:
    key = ObjectKey("m", 0, b"\x03")
    async with _gds_open(tmp_path, use_cufile="true") as a:
        assert await a.get_into(key, torch.zeros(10, dtype=torch.uint8)) is None
        await a.put(key, _tensor(b"z" * 5000))
        small = torch.full((4999,), 1, dtype=torch.uint8)
        with pytest.raises(BufferTooSmallError):
            await a.get_into(key, small)
        assert (small == 1).all(), "a failed get_into must not write"
        # Any dtype and shape: the payload is the tensor's bytes.
        f32 = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        await a.put(key, f32)
        assert await a.get(key) == f32.numpy().tobytes()
        back = torch.empty(3, 4, dtype=torch.float32)
        assert await a.get_into(key, back) == 48
        assert torch.equal(back, f32)
        with pytest.raises(ValueError, match="contiguous"):
            await a.put(key, f32.t())


async def test_cufile_put_failure_leaves_no_temp(
    tmp_path: Path, fake_kvikio: type[FakeCuFile]
) -> None:
    key = ObjectKey("m", 0, b"\x04")
    async with _gds_open(tmp_path, use_cufile="true") as a:
        await a.put(key, _tensor(b"old" * 1000))
        fake_kvikio.fail_open = "cuFile I/O error"
        with pytest.raises(Exception, match="cuFile write failed"):
            await a.put(key, _tensor(b"new" * 1000))
        fake_kvikio.fail_open = None
        assert [p for p in _files(tmp_path) if ".tmp-" in p] == []
        assert await a.get(key) == b"old" * 1000


async def test_put_many_mixes_host_and_device(
    tmp_path: Path, fake_kvikio: type[FakeCuFile]
) -> None:
    keys = [ObjectKey("m", 0, bytes([i])) for i in range(6)]
    datas = [_pattern(3000 * i + 1, i) for i in range(6)]
    items = [
        (k, _tensor(d) if i % 2 else d) for i, (k, d) in enumerate(zip(keys, datas, strict=True))
    ]
    async with _gds_open(tmp_path, use_cufile="true") as a:
        await a.put_many(items)
        assert await a.get_many(keys) == datas
    assert sum(c[0] == "pwrite" for c in fake_kvikio.calls) == 3


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536])
def test_tensor_checksum_streams_in_chunks(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(_gds, "_HASH_CHUNK", 65536)
    data = _pattern(size, 3)
    assert tensor_checksum(_tensor(data)) == checksum(data)


# -- the staged path (no cuFile) --------------------------------------------------------------


async def test_staged_path(tmp_path: Path, as_device: None) -> None:
    data = _pattern(100_000, 9)
    key = ObjectKey("m", 0, b"\x05")
    async with _gds_open(tmp_path, use_cufile="false") as a:
        await a.put(key, _tensor(data).view(torch.int32))  # staged through host memory
        assert await a.get(key) == data
        out = torch.full((len(data) + 8,), 0xEE, dtype=torch.uint8)
        assert await a.get_into(key, out) == len(data)
        assert out[: len(data)].numpy().tobytes() == data
        assert (out[len(data) :] == 0xEE).all()
        with pytest.raises(BufferTooSmallError):
            await a.get_into(key, out[:10])
        _flip(a.object_path(key), 4096 + 5)
        keep = torch.full((len(data),), 0x55, dtype=torch.uint8)
        assert await a.get_into(key, keep) is None
        assert (keep == 0x55).all(), "a corrupt object never reaches the caller's tensor"
        assert a.corrupt_objects == 1


# -- gds and fs directories are interchangeable ----------------------------------------------


@pytest.mark.parametrize("layout", ["sharded", "flat"])
async def test_gds_and_fs_directories_are_interchangeable(tmp_path: Path, layout: str) -> None:
    keys = [ObjectKey("org/m", r, bytes([i]), s) for i in range(5) for r, s in ((0, ""), (1, "b"))]
    long_key = ObjectKey("x/" * 200 + "m", 3, b"\xcd" * 64, "s")  # hashed filename
    datas = {k: _pattern(1000 * i + 3, i) for i, k in enumerate([*keys, long_key])}
    # Same payloads written by each adapter: identical trees, byte for byte.
    async with _gds_open(tmp_path / "gds", layout=layout) as g:
        await g.put_many(datas.items())
    async with _fs_open(tmp_path / "fs", layout=layout) as f:
        await f.put_many(datas.items())
    assert _files(tmp_path / "gds") == _files(tmp_path / "fs")
    # Each reads, scans and checks the other's directory.
    for reader, d in ((_fs_open, "gds"), (_gds_open, "fs")):
        async with reader(tmp_path / d, layout=layout) as r:
            assert await r.get_many(list(datas)) == list(datas.values())
            assert {i.key: i.size async for i in r.scan()} == {k: len(v) for k, v in datas.items()}
            report = await r.check()
            assert report.ok and report.objects == len(datas)


# -- on a GPU ---------------------------------------------------------------------------------


def _cuda_tensor(data: bytes) -> torch.Tensor:
    return _tensor(data).to("cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("use_cufile", ["auto", "false"])
async def test_gpu_round_trip(tmp_path: Path, use_cufile: str) -> None:
    data = _pattern(4 * (1 << 20) + 123, 1)
    key = ObjectKey("m", 0, b"\x01")
    async with _gds_open(tmp_path, use_cufile=use_cufile) as a:
        src = _cuda_tensor(data).view(torch.uint8)
        await a.put(key, src)
        assert await a.get(key) == data
        out = torch.full((len(data) + 64,), 7, dtype=torch.uint8, device="cuda")
        assert await a.get_into(key, out) == len(data)
        assert out[: len(data)].cpu().numpy().tobytes() == data
        assert (out[len(data) :] == 7).all().item()
        half = torch.empty(len(data) // 2, dtype=torch.float16, device="cuda")
        with pytest.raises(BufferTooSmallError):
            await a.get_into(key, half)
    async with _fs_open(tmp_path) as f:
        assert await f.get(key) == data


@gpu
@needs_cuda
@pytest.mark.parametrize("use_cufile", ["auto", "false"])
async def test_gpu_corrupt_file_is_a_miss(tmp_path: Path, use_cufile: str) -> None:
    data = _pattern(1 << 20, 2)
    key = ObjectKey("m", 0, b"\x02")
    async with _gds_open(tmp_path, use_cufile=use_cufile) as a:
        await a.put(key, _cuda_tensor(data))
        _flip(a.object_path(key), 4096 + 777)
        out = torch.zeros(len(data), dtype=torch.uint8, device="cuda")
        assert await a.get_into(key, out) is None
        assert a.corrupt_objects == 1
        assert await a.get(key) is None


@gpu
@needs_cuda
async def test_gpu_uses_cufile_when_kvikio_is_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kvikio = pytest.importorskip("kvikio")
    opened: list[str] = []
    real = kvikio.CuFile

    def spy(path: str, flags: str = "r") -> Any:
        opened.append(flags)
        return real(path, flags)

    async with _gds_open(tmp_path) as a:
        info = a.info()
        assert info["cufile"] is True, info["cufile_note"]
        monkeypatch.setattr(kvikio, "CuFile", spy)
        data = _pattern(3 * 4096 + 5, 3)
        key = ObjectKey("m", 0, b"\x03")
        await a.put(key, _cuda_tensor(data))
        out = torch.empty(len(data), dtype=torch.uint8, device="cuda")
        assert await a.get_into(key, out) == len(data)
        assert out.cpu().numpy().tobytes() == data
    assert opened == ["r+", "r"]
