"""Paged KV-cache layouts: validation, description and the per-plane view used by the copies.

A *plane* is one layer's K cache, V cache, or MLA latent cache. Every supported layout stores
each block of a plane as ``block_bytes`` contiguous bytes at a fixed stride, so one
``(tensor, byte offset, byte stride)`` triple per plane describes any of them; the chunk is
planes ordered ``(kv, layer)``, each holding its blocks back to back.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import torch

LayoutName: TypeAlias = Literal["flashinfer", "mla", "sglang", "vllm"]
KVCaches: TypeAlias = Sequence[torch.Tensor] | Sequence[tuple[torch.Tensor, torch.Tensor]]
BlockIds: TypeAlias = Sequence[int] | torch.Tensor | np.ndarray[Any, Any]

LAYOUTS: tuple[LayoutName, ...] = ("flashinfer", "mla", "sglang", "vllm")

_LAYER_SHAPES: dict[str, str] = {
    "vllm": "[2, num_blocks, block_size, num_kv_heads, head_size]",
    "flashinfer": "[num_blocks, 2, block_size, num_kv_heads, head_size]",
    "mla": "[num_blocks, block_size, head_size]",
    "sglang": "a (k, v) pair of [num_blocks * block_size, num_kv_heads, head_size]",
}


@dataclass(frozen=True)
class KVCacheSpec:
    """What a list of per-layer KV caches holds, as read from the tensors.

    ``num_kv_heads`` is 1 for MLA, whose latent cache has no head dimension. ``block_nbytes``
    is the size of one block of one plane (one layer's K or V, or its MLA cache).
    """

    layout: LayoutName
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def num_planes(self) -> int:
        """Planes per layer: 2 (K and V), or 1 for MLA."""
        return 1 if self.layout == "mla" else 2

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one plane."""
        heads = 1 if self.layout == "mla" else self.num_kv_heads
        return self.block_size * heads * self.head_size * _itemsize(self.dtype)

    def chunk_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of the chunk holding ``num_blocks`` blocks of every layer.

        ``[2, num_layers, num_blocks * block_size, num_kv_heads, head_size]``, or
        ``[num_layers, num_blocks * block_size, head_size]`` for MLA.
        """
        tokens = _positive_int("num_blocks", num_blocks) * self.block_size
        if self.layout == "mla":
            return (self.num_layers, tokens, self.head_size)
        return (2, self.num_layers, tokens, self.num_kv_heads, self.head_size)

    def chunk_nbytes(self, num_blocks: int) -> int:
        """Bytes of the chunk holding ``num_blocks`` blocks of every layer."""
        return math.prod(self.chunk_shape(num_blocks)) * _itemsize(self.dtype)


@dataclass(frozen=True)
class Plane:
    """One plane's blocks: block ``b`` is ``block_nbytes`` bytes at ``offset + b * stride``
    bytes from the start of ``tensor``'s data."""

    tensor: torch.Tensor
    offset: int
    stride: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")
    return value


def check_layout(layout: object) -> LayoutName:
    """Return ``layout`` if it names a supported layout, else raise naming the choices."""
    if not isinstance(layout, str):
        raise TypeError(f"layout: must be a str, got {type(layout).__name__}")
    for name in LAYOUTS:
        if layout == name:
            return name
    raise ValueError(f"layout: must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")


def _layer_tensors(kv_caches: object, layout: LayoutName) -> list[list[torch.Tensor]]:
    """The tensors of each layer (one, or k and v for sglang), type-checked."""
    if isinstance(kv_caches, torch.Tensor) or not isinstance(kv_caches, Sequence):
        raise TypeError(
            f"kv_caches: must be a list of per-layer tensors ({_LAYER_SHAPES[layout]}), "
            f"got {type(kv_caches).__name__}"
        )
    if len(kv_caches) == 0:
        raise ValueError("kv_caches: must hold at least one layer")
    layers: list[list[torch.Tensor]] = []
    for i, layer in enumerate(kv_caches):
        if layout == "sglang":
            if (
                not isinstance(layer, Sequence)
                or isinstance(layer, torch.Tensor)
                or len(layer) != 2
                or not all(isinstance(t, torch.Tensor) for t in layer)
            ):
                raise TypeError(f"kv_caches[{i}]: the sglang layout takes (k, v) tensor pairs")
            layers.append([layer[0], layer[1]])
        else:
            if not isinstance(layer, torch.Tensor):
                raise TypeError(
                    f"kv_caches[{i}]: must be a tensor {_LAYER_SHAPES[layout]}, "
                    f"got {type(layer).__name__}"
                )
            layers.append([layer])
    return layers


def _check_uniform(layers: list[list[torch.Tensor]], layout: LayoutName) -> torch.Tensor:
    first = layers[0][0]
    for i, tensors in enumerate(layers):
        for j, t in enumerate(tensors):
            where = f"kv_caches[{i}]" + (f"[{j}]" if layout == "sglang" else "")
            if t.shape != first.shape:
                raise ValueError(
                    f"{where}: shape {tuple(t.shape)} differs from kv_caches[0] "
                    f"{tuple(first.shape)}; all layers must have one shape"
                )
            if t.dtype != first.dtype:
                raise TypeError(
                    f"{where}: dtype {t.dtype} differs from kv_caches[0] {first.dtype}; "
                    "all layers must have one dtype"
                )
            if t.device != first.device:
                raise ValueError(
                    f"{where}: device {t.device} differs from kv_caches[0] {first.device}; "
                    "all layers must be on one device"
                )
            if not t.is_contiguous():
                raise ValueError(f"{where}: must be contiguous")
    return first


def describe_kv_caches(
    kv_caches: KVCaches, layout: str, *, block_size: int | None = None
) -> KVCacheSpec:
    """Describe per-layer KV caches of a named layout (see ``LAYOUTS``).

    ``block_size`` is read from the tensors except for ``"sglang"``, whose token-major tensors
    do not record it: pass it there. Where given for another layout it must match the tensors.
    Raises ``TypeError``/``ValueError`` naming the argument and the rule it breaks.
    """
    name = check_layout(layout)
    first = _check_uniform(_layer_tensors(kv_caches, name), name)
    shape = tuple(first.shape)
    expected_ndim = 3 if name in ("mla", "sglang") else 5
    if len(shape) != expected_ndim:
        raise ValueError(
            f"kv_caches[0]: the {name} layout takes {_LAYER_SHAPES[name]}, got shape {shape}"
        )
    if any(d == 0 for d in shape):
        raise ValueError(f"kv_caches[0]: every dimension must be non-empty, got shape {shape}")
    if name == "vllm":
        if shape[0] != 2:
            raise ValueError(f"kv_caches[0]: the vllm layout needs dim 0 == 2 (K, V), got {shape}")
        num_blocks, bs, heads, head_size = shape[1], shape[2], shape[3], shape[4]
    elif name == "flashinfer":
        if shape[1] != 2:
            raise ValueError(
                f"kv_caches[0]: the flashinfer layout needs dim 1 == 2 (K, V), got {shape}"
            )
        num_blocks, bs, heads, head_size = shape[0], shape[2], shape[3], shape[4]
    elif name == "mla":
        num_blocks, bs, heads, head_size = shape[0], shape[1], 1, shape[2]
    else:
        if block_size is None:
            raise ValueError(
                "block_size: the sglang layout does not record it in the tensors; pass it"
            )
        bs = _positive_int("block_size", block_size)
        if shape[0] % bs:
            raise ValueError(
                f"block_size: {bs} does not divide the {shape[0]} token slots of kv_caches[0]"
            )
        num_blocks, heads, head_size = shape[0] // bs, shape[1], shape[2]
    if block_size is not None and _positive_int("block_size", block_size) != bs:
        raise ValueError(f"block_size: {block_size} differs from the tensors' block size {bs}")
    return KVCacheSpec(
        layout=name,
        num_layers=len(kv_caches),
        num_blocks=num_blocks,
        block_size=bs,
        num_kv_heads=heads,
        head_size=head_size,
        dtype=first.dtype,
        device=first.device,
    )


def chunk_shape(
    kv_caches: KVCaches, num_blocks: int, layout: str, *, block_size: int | None = None
) -> tuple[int, ...]:
    """Shape of the chunk that holds ``num_blocks`` blocks of all layers of ``kv_caches``."""
    return describe_kv_caches(kv_caches, layout, block_size=block_size).chunk_shape(num_blocks)


def chunk_nbytes(
    kv_caches: KVCaches, num_blocks: int, layout: str, *, block_size: int | None = None
) -> int:
    """Bytes of the chunk that holds ``num_blocks`` blocks of all layers of ``kv_caches``."""
    return describe_kv_caches(kv_caches, layout, block_size=block_size).chunk_nbytes(num_blocks)


def planes(kv_caches: KVCaches, spec: KVCacheSpec) -> list[Plane]:
    """The planes of validated caches, ordered ``(kv, layer)`` like the chunk."""
    bb = spec.block_nbytes
    result: list[Plane] = []
    for kv in range(spec.num_planes):
        for layer in kv_caches:
            if spec.layout == "vllm":
                assert isinstance(layer, torch.Tensor)
                result.append(Plane(layer, kv * spec.num_blocks * bb, bb))
            elif spec.layout == "flashinfer":
                assert isinstance(layer, torch.Tensor)
                result.append(Plane(layer, kv * bb, 2 * bb))
            elif spec.layout == "mla":
                assert isinstance(layer, torch.Tensor)
                result.append(Plane(layer, 0, bb))
            else:
                result.append(Plane(layer[kv], 0, bb))
    return result


@dataclass(frozen=True)
class BlockIndex:
    """Validated block ids: a CPU int64 tensor and its extremes."""

    index: torch.Tensor
    lowest: int
    highest: int

    def __len__(self) -> int:
        return int(self.index.numel())

    def check_range(self, num_blocks: int) -> None:
        """Raise unless every id lies in ``[0, num_blocks)``."""
        if self.lowest < 0:
            raise ValueError(
                f"block_ids: {self.lowest} is negative; ids must be in [0, {num_blocks})"
            )
        if self.highest >= num_blocks:
            raise ValueError(
                f"block_ids: {self.highest} is out of range; the cache has blocks [0, {num_blocks})"
            )


def _first_repeat(values: Sequence[int]) -> int | None:
    seen: set[int] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def block_index(block_ids: object, *, unique: bool) -> BlockIndex:
    """Validate ``block_ids`` and return them as a CPU int64 tensor.

    Accepts a sequence of ints, or a 1-D integer tensor or numpy array. ``unique`` rejects
    repeated ids (a scatter would write one block twice). The range is checked separately,
    once the cache's block count is known.
    """
    if isinstance(block_ids, np.ndarray):
        block_ids = torch.from_numpy(block_ids)
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dtype == torch.bool or block_ids.is_floating_point() or block_ids.is_complex():
            raise TypeError(f"block_ids: must hold integers, got dtype {block_ids.dtype}")
        if block_ids.dim() != 1:
            raise ValueError(
                f"block_ids: must be 1-D, got a tensor of shape {tuple(block_ids.shape)}"
            )
        index = block_ids.detach().to(device="cpu", dtype=torch.int64)
        if index.numel() == 0:
            raise ValueError("block_ids: must not be empty")
        lowest, highest = int(index.min()), int(index.max())
        repeated = (
            _first_repeat(index.tolist())
            if unique and int(torch.unique(index).numel()) != index.numel()
            else None
        )
    else:
        if isinstance(block_ids, (str, bytes)) or not isinstance(block_ids, Sequence):
            raise TypeError(
                "block_ids: must be a sequence of ints or a 1-D integer tensor, "
                f"got {type(block_ids).__name__}"
            )
        values: list[int] = []
        for i, b in enumerate(block_ids):
            if isinstance(b, bool):
                raise TypeError(f"block_ids[{i}]: must be an int, got bool")
            try:
                values.append(operator.index(b))
            except TypeError:
                raise TypeError(f"block_ids[{i}]: must be an int, got {type(b).__name__}") from None
        if not values:
            raise ValueError("block_ids: must not be empty")
        lowest, highest = min(values), max(values)
        repeated = _first_repeat(values) if unique else None
        index = torch.tensor(values, dtype=torch.int64)
    if repeated is not None:
        raise ValueError(
            f"block_ids: {repeated} appears more than once; a scatter writes each block once"
        )
    return BlockIndex(index, lowest, highest)


def check_chunk(name: str, chunk: object, spec: KVCacheSpec, num_blocks: int) -> torch.Tensor:
    """Check that ``chunk`` (argument ``name``) is a contiguous chunk of ``num_blocks`` blocks."""
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"{name}: must be a torch.Tensor, got {type(chunk).__name__}")
    expected = spec.chunk_shape(num_blocks)
    if tuple(chunk.shape) != expected:
        raise ValueError(
            f"{name}: shape {tuple(chunk.shape)} does not fit {num_blocks} blocks of this "
            f"{spec.layout} cache; expected {expected}"
        )
    if chunk.dtype != spec.dtype:
        raise TypeError(f"{name}: dtype {chunk.dtype} differs from the cache dtype {spec.dtype}")
    if not chunk.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    return chunk


def infer_block_size(name: str, chunk: object, num_blocks: int) -> int:
    """Block size of an sglang chunk: its token count divided by the number of blocks."""
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"{name}: must be a torch.Tensor, got {type(chunk).__name__}")
    if chunk.dim() != 5:
        raise ValueError(
            f"{name}: a chunk is [2, num_layers, tokens, num_kv_heads, head_size], "
            f"got shape {tuple(chunk.shape)}"
        )
    tokens = int(chunk.shape[2])
    if tokens == 0 or tokens % num_blocks:
        raise ValueError(
            f"{name}: its {tokens} tokens are not a positive multiple of the {num_blocks} block ids"
        )
    return tokens // num_blocks
