"""Block copies (flexkv_store.transfer): layouts, gather/scatter (the C and torch CPU paths),
validation, kernels, pool."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexkv_store.transfer import (
    LAYOUTS,
    BufferPool,
    KVCacheSpec,
    _cpu,
    _cuda,
    chunk_nbytes,
    chunk_shape,
    describe_kv_caches,
    gather_blocks,
    scatter_blocks,
)

REPO = Path(__file__).resolve().parents[1]
DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float8_e4m3fn,
    torch.uint8,
    torch.int8,
]
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(params=["c", "torch"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with CPU copies through the C routine and once through torch ops."""
    path: str = request.param
    if path == "torch":
        monkeypatch.setattr(_cpu, "library", lambda: None)
    elif _cpu.library() is None:
        reason = f"the C block copy is unavailable: {_cpu.cpu_path_note()}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


#: Gather/scatter tests run on both CPU paths; the results must be bit-identical.
both_cpu_paths = pytest.mark.usefixtures("cpu_path")


# -- helpers --------------------------------------------------------------------------------


def layer_shape(layout: str, nb: int, bs: int, h: int, d: int) -> tuple[int, ...]:
    return {
        "vllm": (2, nb, bs, h, d),
        "flashinfer": (nb, 2, bs, h, d),
        "mla": (nb, bs, d),
        "sglang": (nb * bs, h, d),
    }[layout]


def random_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: str = "cpu"
) -> torch.Tensor:
    """Random *bytes* viewed as ``dtype``: NaN payloads and all, so copies must move bits."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = int(np.prod(shape)) * itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(shape).to(device)


def make_caches(
    layout: str,
    num_layers: int,
    nb: int,
    bs: int,
    h: int,
    d: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    *,
    one_allocation: bool = False,
    device: str = "cpu",
) -> list[Any]:
    shape = layer_shape(layout, nb, bs, h, d)
    per_layer = 2 if layout == "sglang" else 1
    if one_allocation:
        whole = random_tensor((num_layers * per_layer, *shape), dtype, gen, device)
        tensors = list(whole.unbind(0))
    else:
        tensors = [random_tensor(shape, dtype, gen, device) for _ in range(num_layers * per_layer)]
    if layout == "sglang":
        return [(tensors[2 * i], tensors[2 * i + 1]) for i in range(num_layers)]
    return tensors


def zeros_like_caches(caches: list[Any]) -> list[Any]:
    return [
        tuple(torch.zeros_like(t) for t in c) if isinstance(c, tuple) else torch.zeros_like(c)
        for c in caches
    ]


def block(caches: list[Any], layout: str, bs: int, layer: int, kv: int, b: int) -> torch.Tensor:
    """Block ``b`` of one plane, read by plain indexing (the reference)."""
    c: Any = caches[layer]
    result: torch.Tensor
    if layout == "vllm":
        result = c[kv, b]
    elif layout == "flashinfer":
        result = c[b, kv]
    elif layout == "mla":
        result = c[b]
    else:
        result = c[kv][b * bs : (b + 1) * bs]
    return result


def reference_gather(caches: list[Any], ids: list[int], layout: str, bs: int) -> torch.Tensor:
    planes = 1 if layout == "mla" else 2
    per_plane = [
        torch.stack(
            [
                torch.cat([block(caches, layout, bs, layer, kv, b) for b in ids])
                for layer in range(len(caches))
            ]
        )
        for kv in range(planes)
    ]
    return per_plane[0] if layout == "mla" else torch.stack(per_plane)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.equal(as_bytes(a), as_bytes(b))


def check_round_trip(
    caches: list[Any], layout: str, bs: int, gather_ids: list[int], scatter_ids: list[int]
) -> None:
    """gather == reference; scatter into fresh caches writes exactly the chosen blocks."""
    dtype = describe_kv_caches(caches, layout, block_size=bs).dtype
    device = describe_kv_caches(caches, layout, block_size=bs).device
    out = torch.empty(chunk_shape(caches, len(gather_ids), layout, block_size=bs), dtype=dtype)
    out = out.to(device)
    assert gather_blocks(caches, gather_ids, out, layout) is out
    assert_same_bits(out, reference_gather(caches, gather_ids, layout, bs))

    chunk = torch.empty(
        chunk_shape(caches, len(scatter_ids), layout, block_size=bs), dtype=dtype, device=device
    )
    gather_blocks(caches, scatter_ids, chunk, layout)
    fresh = zeros_like_caches(caches)
    scatter_blocks(chunk, fresh, scatter_ids, layout)
    spec = describe_kv_caches(caches, layout, block_size=bs)
    chosen = set(scatter_ids)
    for layer in range(spec.num_layers):
        for kv in range(spec.num_planes):
            for b in range(spec.num_blocks):
                got = block(fresh, layout, bs, layer, kv, b)
                if b in chosen:
                    assert_same_bits(got, block(caches, layout, bs, layer, kv, b))
                else:
                    assert not as_bytes(got).any(), f"block {b} was written but not chosen"


# -- gather / scatter -----------------------------------------------------------------------


@both_cpu_paths
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_layout_and_dtype(layout: str, dtype: torch.dtype) -> None:
    seed = LAYOUTS.index(layout) * 100 + DTYPES.index(dtype)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    caches = make_caches(layout, 3, 12, 4, 2, 8, dtype, gen)
    gather_ids = [rng.randrange(12) for _ in range(7)]  # repeats allowed in a gather
    scatter_ids = rng.sample(range(12), 5)
    check_round_trip(caches, layout, 4, gather_ids, scatter_ids)


@both_cpu_paths
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_allocation_matches_separate_tensors(layout: str) -> None:
    # Views of one storage take a single-op path; separate tensors one op per plane.
    gen = torch.Generator().manual_seed(7)
    shared = make_caches(layout, 4, 10, 2, 3, 4, torch.bfloat16, gen, one_allocation=True)
    separate = [tuple(t.clone() for t in c) if isinstance(c, tuple) else c.clone() for c in shared]
    ids = [9, 0, 4, 5]
    shape = chunk_shape(shared, len(ids), layout, block_size=2)
    a = gather_blocks(shared, ids, torch.empty(shape, dtype=torch.bfloat16), layout)
    b = gather_blocks(separate, ids, torch.empty(shape, dtype=torch.bfloat16), layout)
    assert_same_bits(a, b)
    check_round_trip(shared, layout, 2, ids, ids)


@both_cpu_paths
# The fixture only selects a path; it holds no state that examples could share.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    num_layers=st.integers(1, 3),
    nb=st.integers(1, 9),
    bs=st.integers(1, 4),
    h=st.integers(1, 3),
    d=st.integers(1, 9),
    one_allocation=st.booleans(),
    data=st.data(),
)
def test_round_trip_property(
    layout: str,
    dtype: torch.dtype,
    num_layers: int,
    nb: int,
    bs: int,
    h: int,
    d: int,
    one_allocation: bool,
    data: st.DataObject,
) -> None:
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    caches = make_caches(
        layout, num_layers, nb, bs, h, d, dtype, gen, one_allocation=one_allocation
    )
    gather_ids = data.draw(st.lists(st.integers(0, nb - 1), min_size=1, max_size=8))
    scatter_ids = data.draw(st.lists(st.integers(0, nb - 1), min_size=1, max_size=nb, unique=True))
    check_round_trip(caches, layout, bs, gather_ids, scatter_ids)


@both_cpu_paths
def test_misaligned_views_fall_back_to_narrow_words() -> None:
    # Layers at odd byte offsets of one buffer, 3-byte blocks: only byte-wide words fit.
    raw = torch.randint(0, 256, (1 + 2 * 2 * 5 * 3,), dtype=torch.uint8)
    layers = [raw[1 + i * 30 : 1 + (i + 1) * 30].view(2, 5, 1, 1, 3) for i in range(2)]
    check_round_trip(layers, "vllm", 1, [4, 4, 0], [3, 1])
    # fp16 layers at a 2-byte offset with 16-byte blocks: 2-byte words.
    raw16 = torch.randint(0, 256, (2 + 6 * 2 * 4 * 2,), dtype=torch.uint8)
    mla = [raw16[2:].view(torch.float16).view(6, 2, 4)]
    check_round_trip(mla, "mla", 2, [5, 1], [2, 0, 5])


@both_cpu_paths
@pytest.mark.parametrize(
    "ids",
    [
        [3, 1],
        (3, 1),
        torch.tensor([3, 1], dtype=torch.int32),
        torch.tensor([3, 1]),
        np.array([3, 1], dtype=np.int64),
        [np.int64(3), np.int16(1)],
        torch.tensor([3, 0, 1, 9])[::2],
    ],
    ids=["list", "tuple", "int32-tensor", "int64-tensor", "numpy", "numpy-scalars", "strided"],
)
def test_block_id_forms(ids: Any) -> None:
    gen = torch.Generator().manual_seed(1)
    caches = make_caches("vllm", 2, 5, 2, 1, 4, torch.float16, gen)
    out = torch.empty(chunk_shape(caches, 2, "vllm"), dtype=torch.float16)
    gather_blocks(caches, ids, out, "vllm")
    assert_same_bits(out, reference_gather(caches, [3, 1], "vllm", 2))
    fresh = zeros_like_caches(caches)
    scatter_blocks(out, fresh, ids, "vllm")
    assert_same_bits(fresh[1][:, 3], caches[1][:, 3])


@both_cpu_paths
def test_range_block_ids() -> None:
    gen = torch.Generator().manual_seed(2)
    caches = make_caches("flashinfer", 2, 6, 2, 1, 4, torch.float32, gen)
    check_round_trip(caches, "flashinfer", 2, list(range(2, 5)), list(range(6)))
    out = torch.empty(chunk_shape(caches, 3, "flashinfer"), dtype=torch.float32)
    gather_blocks(caches, range(2, 5), out, "flashinfer")
    assert_same_bits(out, reference_gather(caches, [2, 3, 4], "flashinfer", 2))


@both_cpu_paths
def test_sglang_block_size_from_chunk_or_argument() -> None:
    gen = torch.Generator().manual_seed(3)
    caches = make_caches("sglang", 2, 6, 4, 2, 2, torch.float16, gen)
    out = torch.empty(chunk_shape(caches, 2, "sglang", block_size=4), dtype=torch.float16)
    gather_blocks(caches, [5, 0], out, "sglang")
    assert_same_bits(out, reference_gather(caches, [5, 0], "sglang", 4))
    gather_blocks(caches, [5, 0], out, "sglang", block_size=4)
    assert_same_bits(out, reference_gather(caches, [5, 0], "sglang", 4))
    # The same bytes read as 8 blocks of 2 tokens is a different, equally valid request.
    out2 = torch.empty(chunk_shape(caches, 4, "sglang", block_size=2), dtype=torch.float16)
    gather_blocks(caches, [10, 11, 0, 1], out2, "sglang")
    assert_same_bits(out2, out)


# -- describing layouts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "heads", "planes", "shape"),
    [
        ("vllm", 8, 2, (2, 32, 48, 8, 128)),
        ("flashinfer", 8, 2, (2, 32, 48, 8, 128)),
        ("mla", 1, 1, (32, 48, 128)),
        ("sglang", 8, 2, (2, 32, 48, 8, 128)),
    ],
)
def test_describe_and_chunk_helpers(
    layout: str, heads: int, planes: int, shape: tuple[int, ...]
) -> None:
    meta = [torch.empty(layer_shape(layout, 20, 16, 8, 128), dtype=torch.bfloat16, device="meta")]
    caches: list[Any] = [(meta[0], meta[0])] if layout == "sglang" else meta
    caches = caches * 32
    spec = describe_kv_caches(caches, layout, block_size=16)
    assert spec.layout == layout
    assert spec == KVCacheSpec(
        layout=spec.layout,
        num_layers=32,
        num_blocks=20,
        block_size=16,
        num_kv_heads=heads,
        head_size=128,
        dtype=torch.bfloat16,
        device=torch.device("meta"),
    )
    assert spec.num_planes == planes
    assert spec.block_nbytes == 16 * heads * 128 * 2
    assert chunk_shape(caches, 3, layout, block_size=16) == shape
    assert chunk_nbytes(caches, 3, layout, block_size=16) == int(np.prod(shape)) * 2
    assert spec.chunk_nbytes(3) == planes * 32 * 3 * spec.block_nbytes


# -- validation -----------------------------------------------------------------------------


def _vllm(n: int = 2, **kw: Any) -> list[torch.Tensor]:
    return [torch.zeros(2, 4, 2, 1, 4, **kw) for _ in range(n)]


def _out(n: int = 2, **kw: Any) -> torch.Tensor:
    return torch.zeros(2, 2, 2 * n, 1, 4, **kw)


# Untyped aliases for the calls that pass wrong types on purpose.
gather_untyped: Any = gather_blocks
describe_untyped: Any = describe_kv_caches

ERRORS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    (
        "layout-name",
        lambda: gather_blocks(_vllm(), [0], _out(1), "paged"),
        ValueError,
        r"layout: must be one of 'flashinfer', 'mla', 'sglang', 'vllm'; got 'paged'",
    ),
    (
        "layout-type",
        lambda: gather_untyped(_vllm(), [0], _out(1), 3),
        TypeError,
        r"layout: must be a str",
    ),
    (
        "caches-not-list",
        lambda: gather_untyped(torch.zeros(2, 4, 2, 1, 4), [0], _out(1), "vllm"),
        TypeError,
        r"kv_caches: must be a list of per-layer tensors",
    ),
    (
        "caches-empty",
        lambda: gather_blocks([], [0], _out(1), "vllm"),
        ValueError,
        r"kv_caches: must hold at least one layer",
    ),
    (
        "caches-item",
        lambda: gather_untyped([torch.zeros(1), "x"], [0], _out(1), "vllm"),
        TypeError,
        r"kv_caches\[1\]: must be a tensor",
    ),
    (
        "caches-shape",
        lambda: gather_blocks([*_vllm(1), torch.zeros(2, 5, 2, 1, 4)], [0], _out(1), "vllm"),
        ValueError,
        r"kv_caches\[1\]: shape \(2, 5, 2, 1, 4\) differs",
    ),
    (
        "caches-dtype",
        lambda: gather_blocks([*_vllm(1), *_vllm(1, dtype=torch.float16)], [0], _out(1), "vllm"),
        TypeError,
        r"kv_caches\[1\]: dtype torch.float16 differs",
    ),
    (
        "caches-device",
        lambda: gather_blocks([*_vllm(1), *_vllm(1, device="meta")], [0], _out(1), "vllm"),
        ValueError,
        r"kv_caches\[1\]: device meta differs",
    ),
    (
        "caches-contiguous",
        lambda: gather_blocks([torch.zeros(2, 4, 2, 1, 8)[..., ::2]], [0], _out(1)[:, :1], "vllm"),
        ValueError,
        r"kv_caches\[0\]: must be contiguous",
    ),
    (
        "caches-ndim",
        lambda: gather_blocks([torch.zeros(4, 2, 4)], [0], _out(1), "vllm"),
        ValueError,
        r"kv_caches\[0\]: the vllm layout takes \[2, num_blocks",
    ),
    (
        "caches-kv-dim",
        lambda: gather_blocks([torch.zeros(3, 4, 2, 1, 4)], [0], _out(1), "vllm"),
        ValueError,
        r"dim 0 == 2",
    ),
    (
        "flashinfer-kv-dim",
        lambda: gather_blocks([torch.zeros(4, 3, 2, 1, 4)], [0], _out(1), "flashinfer"),
        ValueError,
        r"dim 1 == 2",
    ),
    (
        "caches-empty-dim",
        lambda: gather_blocks([torch.zeros(2, 0, 2, 1, 4)], [0], _out(1), "vllm"),
        ValueError,
        r"every dimension must be non-empty",
    ),
    (
        "sglang-pair",
        lambda: gather_blocks([torch.zeros(8, 1, 4)], [0], _out(1), "sglang"),
        TypeError,
        r"kv_caches\[0\]: the sglang layout takes \(k, v\) tensor pairs",
    ),
    (
        "sglang-block-size",
        lambda: describe_kv_caches([(torch.zeros(8, 1, 4),) * 2], "sglang"),
        ValueError,
        r"block_size: the sglang layout does not record it",
    ),
    (
        "sglang-indivisible",
        lambda: describe_kv_caches([(torch.zeros(8, 1, 4),) * 2], "sglang", block_size=3),
        ValueError,
        r"block_size: 3 does not divide the 8 token slots",
    ),
    (
        "sglang-chunk-tokens",
        lambda: gather_blocks(
            [(torch.zeros(8, 1, 4),) * 2], [0, 1], torch.zeros(2, 1, 3, 1, 4), "sglang"
        ),
        ValueError,
        r"out: its 3 tokens are not a positive multiple of the 2 block ids",
    ),
    (
        "block-size-mismatch",
        lambda: gather_blocks(_vllm(), [0], _out(1), "vllm", block_size=4),
        ValueError,
        r"block_size: 4 differs from the tensors' block size 2",
    ),
    (
        "block-size-type",
        lambda: describe_untyped(_vllm(), "vllm", block_size=2.0),
        TypeError,
        r"block_size: must be an int",
    ),
    (
        "ids-empty",
        lambda: gather_blocks(_vllm(), [], _out(0), "vllm"),
        ValueError,
        r"block_ids: must not be empty",
    ),
    (
        "ids-empty-tensor",
        lambda: gather_blocks(_vllm(), torch.tensor([], dtype=torch.int64), _out(0), "vllm"),
        ValueError,
        r"block_ids: must not be empty",
    ),
    (
        "ids-negative",
        lambda: gather_blocks(_vllm(), [0, -1], _out(2), "vllm"),
        ValueError,
        r"block_ids: -1 is negative; ids must be in \[0, 4\)",
    ),
    (
        "ids-range",
        lambda: gather_blocks(_vllm(), [4], _out(1), "vllm"),
        ValueError,
        r"block_ids: 4 is out of range; the cache has blocks \[0, 4\)",
    ),
    (
        "ids-range-tensor",
        lambda: scatter_blocks(_out(1), _vllm(), torch.tensor([7]), "vllm"),
        ValueError,
        r"block_ids: 7 is out of range",
    ),
    (
        "ids-duplicate",
        lambda: scatter_blocks(_out(3), _vllm(), [1, 2, 1], "vllm"),
        ValueError,
        r"block_ids: 1 appears more than once; a scatter writes each block once",
    ),
    (
        "ids-duplicate-tensor",
        lambda: scatter_blocks(_out(2), _vllm(), torch.tensor([3, 3]), "vllm"),
        ValueError,
        r"block_ids: 3 appears more than once",
    ),
    (
        "ids-float",
        lambda: gather_untyped(_vllm(), [1.0], _out(1), "vllm"),
        TypeError,
        r"block_ids\[0\]: must be an int, got float",
    ),
    (
        "ids-bool",
        lambda: gather_blocks(_vllm(), [True], _out(1), "vllm"),
        TypeError,
        r"block_ids\[0\]: must be an int, got bool",
    ),
    (
        "ids-float-tensor",
        lambda: gather_blocks(_vllm(), torch.tensor([1.0]), _out(1), "vllm"),
        TypeError,
        r"block_ids: must hold integers, got dtype torch.float32",
    ),
    (
        "ids-2d",
        lambda: gather_blocks(_vllm(), torch.tensor([[1]]), _out(1), "vllm"),
        ValueError,
        r"block_ids: must be 1-D",
    ),
    (
        "ids-type",
        lambda: gather_untyped(_vllm(), "12", _out(1), "vllm"),
        TypeError,
        r"block_ids: must be a sequence of ints",
    ),
    (
        "out-type",
        lambda: gather_untyped(_vllm(), [0], np.zeros(8), "vllm"),
        TypeError,
        r"out: must be a torch.Tensor",
    ),
    (
        "out-shape",
        lambda: gather_blocks(_vllm(), [0, 1], _out(1), "vllm"),
        ValueError,
        r"out: shape \(2, 2, 2, 1, 4\) does not fit 2 blocks .* expected \(2, 2, 4, 1, 4\)",
    ),
    (
        "out-dtype",
        lambda: gather_blocks(_vllm(), [0], _out(1, dtype=torch.float16), "vllm"),
        TypeError,
        r"out: dtype torch.float16 differs from the cache dtype torch.float32",
    ),
    (
        "out-contiguous",
        lambda: gather_blocks(_vllm(), [0], torch.zeros(2, 2, 2, 1, 8)[..., ::2], "vllm"),
        ValueError,
        r"out: must be contiguous",
    ),
    (
        "chunk-shape",
        lambda: scatter_blocks(_out(2), _vllm(), [0], "vllm"),
        ValueError,
        r"chunk: shape \(2, 2, 4, 1, 4\) does not fit 1 blocks",
    ),
    (
        "mla-out",
        lambda: gather_blocks([torch.zeros(4, 2, 4)], [0], _out(1), "mla"),
        ValueError,
        r"out: shape .* expected \(1, 2, 4\)",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_validation_errors(call: Callable[[], object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_failed_scatter_writes_nothing() -> None:
    caches = _vllm()
    with pytest.raises(ValueError, match="appears more than once"):
        scatter_blocks(torch.ones(2, 2, 4, 1, 4), caches, [0, 0], "vllm")
    assert not any(c.any() for c in caches)


# -- the C routine for CPU tensors ---------------------------------------------------------


def needs_c_routine() -> Any:
    module = _cpu.library()
    if module is None:
        reason = f"the C block copy is unavailable: {_cpu.cpu_path_note()}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return module


def test_cpu_path_names_the_c_routine() -> None:
    needs_c_routine()
    assert _cpu.cpu_path() == "c"
    assert _cpu.cpu_path_note() is None


def _odd_caches() -> tuple[list[Any], list[int], int]:
    """MLA caches with 3000-byte blocks, 8 layers, 200 of 300 blocks: ~4.8 MB per chunk, so
    pieces of the thread split start in the middle of blocks."""
    gen = torch.Generator().manual_seed(21)
    caches = make_caches("mla", 8, 300, 3, 1, 1000, torch.uint8, gen)
    ids = random.Random(21).sample(range(300), 200)
    return caches, ids, 3000


def _assert_scattered_only_to(fresh: list[torch.Tensor], caches: Any, ids: list[int]) -> None:
    """``fresh`` (zeroed copies of :func:`_odd_caches`) holds the chosen blocks of
    ``caches`` and nothing else."""
    chosen = set(ids)
    for layer in range(8):
        for b in range(300):
            got = block(fresh, "mla", 3, layer, 0, b)
            if b in chosen:
                assert_same_bits(got, block(caches, "mla", 3, layer, 0, b))
            else:
                assert not as_bytes(got).any()


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_c_routine_thread_split_is_exact(threads: int) -> None:
    module = needs_c_routine()
    caches, ids, bb = _odd_caches()
    spec = describe_kv_caches(caches, "mla")
    index = torch.tensor(ids, dtype=torch.int64)
    out = torch.zeros(spec.chunk_shape(len(ids)), dtype=torch.uint8)
    ffi, lib = module.ffi, module.lib
    addresses = ffi.new("uint64_t[]", [t.data_ptr() for t in caches])
    id_ptr = ffi.cast("const int64_t *", index.data_ptr())
    ran = lib.fkv_block_copy(
        addresses, len(caches), id_ptr, len(ids), bb, bb, out.data_ptr(), 0, threads
    )
    assert 1 <= ran <= threads
    assert_same_bits(out, reference_gather(caches, ids, "mla", 3))
    fresh = zeros_like_caches(caches)
    fresh_addresses = ffi.new("uint64_t[]", [t.data_ptr() for t in fresh])
    lib.fkv_block_copy(
        fresh_addresses, len(fresh), id_ptr, len(ids), bb, bb, out.data_ptr(), 1, threads
    )
    _assert_scattered_only_to(fresh, caches, ids)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shift", [0, 5, 64 - 3])
def test_c_routine_streaming_copies_are_exact_at_any_alignment(threads: int, shift: int) -> None:
    # Copies of 4 MiB or more use streaming stores for 64-byte lines, with plain copies for
    # the unaligned head and tail of each piece: the bytes must be the same, and nothing
    # outside the chunk or the chosen blocks may be written.
    module = needs_c_routine()
    caches, ids, bb = _odd_caches()  # 8 planes x 200 blocks x 3000 bytes: 4.8 MB
    total = len(caches) * len(ids) * bb
    assert total >= 4 << 20
    backing = torch.full((total + 128,), 0xA5, dtype=torch.uint8)
    start = (-backing.data_ptr()) % 64 + shift  # the chunk starts `shift` past a line
    ffi, lib = module.ffi, module.lib
    addresses = ffi.new("uint64_t[]", [t.data_ptr() for t in caches])
    index = torch.tensor(ids, dtype=torch.int64)
    id_ptr = ffi.cast("const int64_t *", index.data_ptr())
    chunk_at = backing.data_ptr() + start
    lib.fkv_block_copy(addresses, len(caches), id_ptr, len(ids), bb, bb, chunk_at, 0, threads)
    expected = reference_gather(caches, ids, "mla", 3).reshape(-1).view(torch.uint8)
    assert torch.equal(backing[start : start + total], expected)
    assert bool((backing[:start] == 0xA5).all()) and bool((backing[start + total :] == 0xA5).all())
    fresh = zeros_like_caches(caches)
    fresh_addresses = ffi.new("uint64_t[]", [t.data_ptr() for t in fresh])
    lib.fkv_block_copy(fresh_addresses, len(fresh), id_ptr, len(ids), bb, bb, chunk_at, 1, threads)
    _assert_scattered_only_to(fresh, caches, ids)


def test_c_routine_matches_torch_path_on_large_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    needs_c_routine()
    gen = torch.Generator().manual_seed(22)
    caches = make_caches("flashinfer", 6, 64, 16, 4, 64, torch.bfloat16, gen)
    ids = random.Random(22).sample(range(64), 48)
    shape = chunk_shape(caches, len(ids), "flashinfer")
    by_c = gather_blocks(caches, ids, torch.empty(shape, dtype=torch.bfloat16), "flashinfer")
    fresh_c = zeros_like_caches(caches)
    scatter_blocks(by_c, fresh_c, ids, "flashinfer")
    monkeypatch.setattr(_cpu, "library", lambda: None)
    by_torch = gather_blocks(caches, ids, torch.empty(shape, dtype=torch.bfloat16), "flashinfer")
    fresh_torch = zeros_like_caches(caches)
    scatter_blocks(by_torch, fresh_torch, ids, "flashinfer")
    assert_same_bits(by_c, by_torch)
    for a, b in zip(fresh_c, fresh_torch, strict=True):
        assert_same_bits(a, b)


def test_c_routine_concurrent_callers() -> None:
    # One call at a time gets the helper threads; the others copy on their own thread.
    needs_c_routine()
    caches, ids, _ = _odd_caches()
    expected = reference_gather(caches, ids, "mla", 3)
    shape = chunk_shape(caches, len(ids), "mla")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                out = torch.empty(shape, dtype=torch.uint8)
                gather_blocks(caches, ids, out, "mla")
                assert torch.equal(out, expected)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_c_routine_after_fork() -> None:
    # libgomp's workers do not survive a fork (torch's own ops hang in such a child): the
    # child copies on its one thread, and must not hang.
    needs_c_routine()
    caches, ids, _ = _odd_caches()
    shape = chunk_shape(caches, len(ids), "mla")
    expected = gather_blocks(caches, ids, torch.empty(shape, dtype=torch.uint8), "mla")
    expected_bytes = expected.numpy().tobytes()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            out = torch.empty(shape, dtype=torch.uint8)
            gather_blocks(caches, ids, out, "mla")
            code = 0 if out.numpy().tobytes() == expected_bytes else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


def test_c_build_failure_logs_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_cpu, "_loaded", False)
    monkeypatch.setattr(_cpu, "_module", None)
    monkeypatch.setattr(_cpu, "_reason", None)
    monkeypatch.delenv("FLEXKV_STORE_DISABLE_CPU_KERNEL", raising=False)
    monkeypatch.setenv("FLEXKV_STORE_CSRC", str(tmp_path / "no-sources"))
    monkeypatch.setenv("FLEXKV_STORE_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="flexkv_store.transfer"):
        assert _cpu.library() is None
        assert _cpu.cpu_path() == "torch"
        check_round_trip(_vllm(), "vllm", 2, [3, 0], [1, 2])
    warnings = [r for r in caplog.records if "using the torch path" in r.getMessage()]
    assert len(warnings) == 1
    assert "C sources are not available" in warnings[0].getMessage()
    note = _cpu.cpu_path_note()
    assert note is not None and "C sources" in note


def test_c_routine_builds_into_a_keyed_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    needs_c_routine()
    monkeypatch.setattr(_cpu, "_loaded", False)
    monkeypatch.setattr(_cpu, "_module", None)
    monkeypatch.setattr(_cpu, "_reason", None)
    monkeypatch.setenv("FLEXKV_STORE_CACHE_DIR", str(tmp_path))
    module = _cpu.library()
    assert module is not None
    assert module.path.parent == tmp_path
    assert module.path.name.startswith("_flexkv_block_copy_cpu_")
    assert [p.name for p in tmp_path.iterdir()] == [module.path.name]


def test_c_routine_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu, "_loaded", False)
    monkeypatch.setattr(_cpu, "_module", None)
    monkeypatch.setattr(_cpu, "_reason", None)
    monkeypatch.setenv("FLEXKV_STORE_DISABLE_CPU_KERNEL", "1")
    assert _cpu.cpu_path() == "torch"
    assert "FLEXKV_STORE_DISABLE_CPU_KERNEL" in (_cpu.cpu_path_note() or "")


# -- the CUDA kernel ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernel_compiles_with_nvcc(tmp_path: Path) -> None:
    # Catches a broken kernel on machines without a GPU; warnings count as errors.
    result = subprocess.run(
        [
            "nvcc",
            "-c",
            "-arch=sm_90",
            "--Werror",
            "all-warnings",
            "-I",
            str(REPO / "csrc"),
            str(REPO / "csrc" / "block_copy.cu"),
            "-o",
            str(tmp_path / "block_copy.o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "block_copy.o").stat().st_size > 0


def test_kernel_build_failure_logs_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_cuda, "_loaded", False)
    monkeypatch.setattr(_cuda, "_extension", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("FLEXKV_STORE_DISABLE_CUDA_KERNEL", raising=False)
    monkeypatch.setenv("FLEXKV_STORE_CSRC", str(tmp_path / "no-sources"))
    monkeypatch.setenv("FLEXKV_STORE_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="flexkv_store.transfer"):
        assert _cuda.extension() is None
        assert _cuda.extension() is None
    warnings = [r for r in caplog.records if "using the torch path" in r.getMessage()]
    assert len(warnings) == 1
    assert "kernel sources missing" in warnings[0].getMessage()


def test_vector_width_is_the_widest_common_power_of_two() -> None:
    assert _cuda._vector_width(32768, 65536, 0x7F0000001000) == 16
    assert _cuda._vector_width(32768, 8) == 8
    assert _cuda._vector_width(12, 0x1000) == 4
    assert _cuda._vector_width(6, 16) == 2
    assert _cuda._vector_width(3) == 1


def _gpu_check(
    layout: str, dtype: torch.dtype, out_kind: str, *, one_allocation: bool, d: int = 128
) -> None:
    gen = torch.Generator().manual_seed(11)
    bs = 16
    caches = make_caches(
        layout, 4, 40, bs, 2, d, dtype, gen, one_allocation=one_allocation, device="cuda"
    )
    ids = [37, 2, 5, 5, 19] if out_kind != "scatter" else [37, 2, 5, 19]
    shape = chunk_shape(caches, len(ids), layout, block_size=bs)
    if out_kind == "pinned":
        out = torch.empty(shape, dtype=dtype, pin_memory=True)
    elif out_kind == "pageable":
        out = torch.empty(shape, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype, device="cuda")
    gather_blocks(caches, ids, out, layout)
    assert_same_bits(out, reference_gather(caches, ids, layout, bs))
    if out_kind == "scatter":
        pinned = torch.empty(shape, dtype=dtype, pin_memory=True)
        pinned.copy_(out)
        fresh = zeros_like_caches(caches)
        scatter_blocks(pinned, fresh, ids, layout)
        for layer in range(4):
            for kv in range(1 if layout == "mla" else 2):
                for b in ids:
                    assert_same_bits(
                        block(fresh, layout, bs, layer, kv, b),
                        block(caches, layout, bs, layer, kv, b),
                    )


@gpu
@needs_cuda
def test_gpu_kernel_is_built() -> None:
    assert _cuda.kernel_available()


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("out_kind", ["device", "pinned", "pageable", "scatter"])
def test_gpu_kernel_matches_reference(layout: str, out_kind: str) -> None:
    _gpu_check(layout, torch.bfloat16, out_kind, one_allocation=False)


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [128, 4, 2, 1], ids=["16B", "8B", "4B", "2B"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float32], ids=str)
def test_gpu_kernel_every_vector_width(d: int, dtype: torch.dtype) -> None:
    _gpu_check("mla", dtype, "scatter", one_allocation=True, d=d)


@gpu
@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_torch_path_matches_kernel(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    caches = make_caches(layout, 3, 30, 16, 2, 64, torch.float16, gen, device="cuda")
    ids = [29, 0, 14]
    shape = chunk_shape(caches, 3, layout, block_size=16)
    by_kernel = gather_blocks(
        caches, ids, torch.empty(shape, dtype=torch.float16, pin_memory=True), layout
    )
    monkeypatch.setattr(_cuda, "extension", lambda: None)
    by_torch = gather_blocks(caches, ids, torch.empty(shape, dtype=torch.float16), layout)
    assert_same_bits(by_kernel, by_torch)
    fresh = zeros_like_caches(caches)
    scatter_blocks(by_torch, fresh, ids, layout)
    assert_same_bits(
        gather_blocks(fresh, ids, torch.empty(shape, dtype=torch.float16), layout), by_kernel
    )


@gpu
@needs_cuda
def test_gpu_non_blocking_gather_completes_after_sync() -> None:
    gen = torch.Generator().manual_seed(6)
    caches = make_caches("vllm", 8, 64, 16, 8, 128, torch.bfloat16, gen, device="cuda")
    ids = list(range(63, 0, -2))
    out = torch.empty(chunk_shape(caches, len(ids), "vllm"), dtype=torch.bfloat16, pin_memory=True)
    gather_blocks(caches, ids, out, "vllm", non_blocking=True)
    torch.cuda.current_stream().synchronize()
    assert_same_bits(out, reference_gather(caches, ids, "vllm", 16))


# -- BufferPool -----------------------------------------------------------------------------


def test_pool_reuses_buffers() -> None:
    pool = BufferPool(1 << 20, pin_memory=False)
    a = pool.acquire((2, 4, 16, 8), torch.float16)
    assert a.shape == (2, 4, 16, 8) and a.dtype == torch.float16 and a.is_contiguous()
    ptr = a.data_ptr()
    pool.release(a)
    b = pool.acquire((4, 16, 8), torch.bfloat16)  # smaller request reuses the free buffer
    assert b.data_ptr() == ptr
    with pool.buffer((10,), torch.float32) as c:
        assert c.data_ptr() != ptr and c.shape == (10,)
        c_ptr = c.data_ptr()
    with pool.buffer((10,), torch.float32) as d:
        assert d.data_ptr() == c_ptr
    pool.release(b)
    assert pool.in_use_bytes == 0
    assert pool.held_bytes == 2 * 4 * 16 * 8 * 2 + 40
    pool.clear()
    assert pool.held_bytes == 0


def test_pool_is_bounded() -> None:
    pool = BufferPool(1000, pin_memory=False)
    a = pool.acquire((600,), torch.uint8)
    with pytest.raises(TimeoutError, match="600 bytes not available"):
        pool.acquire((600,), torch.uint8, timeout=0.05)
    with pytest.raises(ValueError, match="more than the pool's capacity of 1000"):
        pool.acquire((1001,), torch.uint8)
    pool.release(a)
    small = pool.acquire((100,), torch.uint8)  # reuses the 600-byte buffer
    pool.release(small)
    big = pool.acquire((900,), torch.uint8)  # the free 600 bytes are dropped to make room
    assert pool.held_bytes == 900
    pool.release(big)


def test_pool_waits_for_a_release() -> None:
    pool = BufferPool(1000, pin_memory=False)
    a = pool.acquire((800,), torch.uint8)
    timer = threading.Timer(0.05, pool.release, args=(a,))
    timer.start()
    b = pool.acquire((800,), torch.uint8, timeout=5)
    timer.join()
    assert b.data_ptr() == a.data_ptr()


def test_pool_rejects_foreign_and_double_release() -> None:
    pool = BufferPool(1000, pin_memory=False)
    with pytest.raises(ValueError, match="not acquired from this pool"):
        pool.release(torch.zeros(4))
    a = pool.acquire((4,), torch.float32)
    pool.release(a)
    with pytest.raises(ValueError, match="already released"):
        pool.release(a)
    with pytest.raises(ValueError, match="capacity_bytes: must be positive"):
        BufferPool(0)
    with pytest.raises(ValueError, match="holds no bytes"):
        pool.acquire((0, 4), torch.float32)


def test_pool_thread_safety() -> None:
    pool = BufferPool(4096, pin_memory=False)
    errors: list[BaseException] = []
    owners: dict[int, int] = {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        try:
            for i in range(200):
                with pool.buffer((256 + 64 * ((k + i) % 4),), torch.uint8, timeout=10) as buf:
                    with lock:
                        assert buf.data_ptr() not in owners, "one buffer handed out twice"
                        owners[buf.data_ptr()] = k
                    assert pool.held_bytes <= 4096
                    buf.fill_(k)
                    assert bool((buf == k).all())
                    with lock:
                        del owners[buf.data_ptr()]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.in_use_bytes == 0


@pytest.mark.skipif(CUDA, reason="checks the CPU-only behaviour")
def test_pool_without_cuda_is_not_pinned() -> None:
    assert not BufferPool(1024).pinned
    with pytest.raises(ValueError, match="pin_memory: pinned buffers need CUDA"):
        BufferPool(1024, pin_memory=True)


@gpu
@needs_cuda
def test_pool_pins_with_cuda() -> None:
    pool = BufferPool(1 << 20)
    assert pool.pinned
    with pool.buffer((1024,), torch.float16) as buf:
        assert buf.is_pinned()
