"""Token ids -> chunk hashes, with namespace isolation.

Two schemes, each matching its peer bit for bit (golden cases in the shared vectors):

* :func:`vllm_block_hashes` — vLLM's prefix-cache hashes (``sha256_cbor``, and vLLM
  0.10's ``sha256_cbor_64bit``), so that vLLM's offload keys, its KV events and our keys
  agree.
* :func:`flexkv_block_hashes` — FlexKV's cumulative XXH64 over namespace and tokens.

In both, a different namespace (cache salt, LoRA, extra namespace info) changes every
hash, and a prefix of a token sequence hashes to a prefix of the hashes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, Literal, overload

import cbor2
import numpy as np
import xxhash

from flexkv_store.keyformat._key import ObjectKey, check_cache_salt

__all__ = [
    "DEFAULT_VLLM_SEED",
    "build_namespace",
    "chunk_keys",
    "event_int",
    "flexkv_block_hashes",
    "vllm_block_hashes",
]

DEFAULT_VLLM_SEED = "vllm-none-hash"
_U64 = (1 << 64) - 1


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _check_block_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int (got {value!r})")


def _as_token_list(token_ids: Sequence[int] | np.ndarray[Any, Any]) -> list[int]:
    if isinstance(token_ids, np.ndarray):
        return [int(t) for t in token_ids.reshape(-1).tolist()]
    return [int(t) for t in token_ids]


VllmAlgo = Literal["sha256_cbor", "sha256_cbor_64bit"]


@overload
def vllm_block_hashes(
    token_ids: Sequence[int] | np.ndarray[Any, Any],
    block_size: int,
    *,
    seed: str | None = None,
    cache_salt: str | None = None,
    lora: tuple[str, str] | Sequence[str] | None = None,
    algo: Literal["sha256_cbor"] = "sha256_cbor",
) -> list[bytes]: ...


@overload
def vllm_block_hashes(
    token_ids: Sequence[int] | np.ndarray[Any, Any],
    block_size: int,
    *,
    seed: str | None = None,
    cache_salt: str | None = None,
    lora: int | None = None,
    algo: Literal["sha256_cbor_64bit"],
) -> list[int]: ...


def vllm_block_hashes(
    token_ids: Sequence[int] | np.ndarray[Any, Any],
    block_size: int,
    *,
    seed: str | None = None,
    cache_salt: str | None = None,
    lora: tuple[str, str] | Sequence[str] | int | None = None,
    algo: VllmAlgo = "sha256_cbor",
) -> list[bytes] | list[int]:
    """vLLM's prefix-cache block hashes, chained per engine block of ``block_size`` tokens.

    ``sha256_cbor`` (vLLM 0.25-0.33): ``NONE_HASH = sha256(cbor(seed))`` (seed default
    ``"vllm-none-hash"``); block ``i`` hashes ``(parent or NONE_HASH, tuple(block_tokens),
    extra)`` with canonical CBOR, where ``extra`` holds ``("lora", name, path)`` on every
    block when ``lora=(name, path)`` is given and ``("cache_salt", salt)`` on block 0
    only, or is ``None``. Returns the 32-byte digests.

    ``sha256_cbor_64bit`` (vLLM 0.10.0-0.10.1 only): the same chain over the digest read
    as a big-endian int masked to its low 64 bits, the parent chained as that int, extra
    keys untagged (``lora`` is the LoRA's int id, then the salt on block 0).
    ``NONE_HASH`` is that hash of ``seed``, which is required: vLLM 0.10 takes it from
    ``PYTHONHASHSEED`` and is random without it. Returns the ints.

    Only full blocks are hashed.
    """
    _check_block_size("block_size", block_size)
    tokens = _as_token_list(token_ids)
    if algo == "sha256_cbor":
        if isinstance(lora, int):
            raise ValueError("lora: sha256_cbor takes (name, path), not a LoRA int id")
        return _vllm_sha256_cbor(tokens, block_size, seed, cache_salt, lora)
    if algo == "sha256_cbor_64bit":
        if lora is not None and (isinstance(lora, bool) or not isinstance(lora, int)):
            raise ValueError("lora: sha256_cbor_64bit takes the LoRA's int id (lora_int_id)")
        if seed is None:
            raise ValueError(
                "seed: sha256_cbor_64bit has no fixed seed (vLLM 0.10 uses PYTHONHASHSEED and "
                "a random one without it); pass the engine's PYTHONHASHSEED"
            )
        return _vllm_sha256_cbor_64bit(tokens, block_size, seed, cache_salt, lora)
    raise ValueError(f"algo must be 'sha256_cbor' or 'sha256_cbor_64bit' (got {algo!r})")


def _vllm_sha256_cbor(
    tokens: list[int],
    block_size: int,
    seed: str | None,
    cache_salt: str | None,
    lora: tuple[str, str] | Sequence[str] | None,
) -> list[bytes]:
    parent = _sha256_cbor(DEFAULT_VLLM_SEED if seed is None else seed)
    lora_part: tuple[str, ...] | None = None
    if lora is not None:
        name, path = lora
        lora_part = ("lora", name, path)
    out: list[bytes] = []
    for i in range(len(tokens) // block_size):
        extra: list[tuple[str, ...]] = []
        if lora_part is not None:
            extra.append(lora_part)
        if i == 0 and cache_salt:
            extra.append(("cache_salt", cache_salt))
        block = tuple(tokens[i * block_size : (i + 1) * block_size])
        parent = _sha256_cbor((parent, block, tuple(extra) if extra else None))
        out.append(parent)
    return out


def _sha256_cbor_64bit(obj: Any) -> int:
    return int.from_bytes(_sha256_cbor(obj), "big") & _U64


def _vllm_sha256_cbor_64bit(
    tokens: list[int], block_size: int, seed: str, cache_salt: str | None, lora_id: int | None
) -> list[int]:
    none_hash = _sha256_cbor_64bit(seed)
    parent: int | None = None
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        extra: list[Any] = []
        if lora_id is not None:
            extra.append(lora_id)
        if i == 0 and cache_salt:
            extra.append(cache_salt)
        block = tuple(tokens[i * block_size : (i + 1) * block_size])
        # vLLM tests the parent for truth: a hash of 0 restarts the chain at NONE_HASH.
        h = _sha256_cbor_64bit((parent or none_hash, block, tuple(extra) if extra else None))
        out.append(h)
        parent = h
    return out


def event_int(block_hash: bytes) -> int:
    """vLLM's KV-event integer form of a block hash: the last 8 bytes, big-endian."""
    return int.from_bytes(block_hash[-8:], "big")


def build_namespace(
    lora_name: str | None = None,
    cache_salt: str | None = None,
    namespace_info: str | Sequence[str] | None = None,
) -> list[str]:
    """FlexKV's namespace order: ``[lora_name, cache_salt, *namespace_info]``.

    Absent parts are skipped.
    """
    ns: list[str] = []
    if lora_name:
        ns.append(lora_name)
    if cache_salt:
        ns.append(cache_salt)
    if namespace_info:
        if isinstance(namespace_info, str):
            ns.append(namespace_info)
        else:
            ns.extend(str(part) for part in namespace_info)
    return ns


def flexkv_block_hashes(
    token_ids: Sequence[int] | np.ndarray[Any, Any],
    tokens_per_block: int,
    namespace: Sequence[str] | None = None,
) -> list[int]:
    """FlexKV's cumulative block hashes.

    XXH64 (seed 0) streamed over the namespace bytes (``"\\x00".join(namespace)`` in UTF-8,
    each byte widened to an int64) and then the tokens as int64 little-endian; the digest
    is taken after each full block.
    """
    _check_block_size("tokens_per_block", tokens_per_block)
    tokens = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8").reshape(-1))
    h = xxhash.xxh64(seed=0)
    if namespace:
        ns_bytes = "\x00".join(namespace).encode("utf-8")
        h.update(np.frombuffer(ns_bytes, dtype=np.uint8).astype("<i8").tobytes())
    raw = memoryview(tokens.tobytes())
    step = tokens_per_block * 8
    out: list[int] = []
    for i in range(tokens.shape[0] // tokens_per_block):
        h.update(raw[i * step : (i + 1) * step])
        out.append(h.intdigest())
    return out


ChunkAlgo = Literal["sha256_cbor", "sha256_cbor_64bit", "xxh64"]


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray[Any, Any],
    *,
    model_name: str,
    kv_rank: int,
    chunk_size: int,
    block_size: int = 16,
    cache_salt: str = "",
    lora: tuple[str, str] | Sequence[str] | int | None = None,
    namespace_info: str | Sequence[str] | None = None,
    algo: ChunkAlgo = "sha256_cbor",
) -> list[ObjectKey]:
    """One :class:`ObjectKey` per full chunk of ``chunk_size`` tokens of ``token_ids``.

    Hashes are chained per engine block of ``block_size`` tokens (the engine's KV block
    size; ``chunk_size`` must be a positive multiple of it), exactly as the engine chains
    them, and a chunk is keyed by the hash of its **last** block. With ``sha256_cbor``
    that is vLLM's own offload key for the chunk (its ``OffloadKey`` minus the 4-byte
    group suffix), so keys computed here and keys vLLM's offloading computes for the same
    tokens are equal.

    The salt both enters the hash and becomes the key's ``cache_salt``. ``sha256_cbor``
    and ``sha256_cbor_64bit`` use :func:`vllm_block_hashes` with the seed vLLM uses
    (``PYTHONHASHSEED`` when set; ``sha256_cbor_64bit`` requires it and stores the 8-byte
    big-endian int; ``lora`` is then the LoRA's int id); ``namespace_info`` has no place
    in vLLM's scheme and is rejected there. ``xxh64`` uses :func:`flexkv_block_hashes`
    over :func:`build_namespace` and stores the 8-byte big-endian digest.
    """
    check_cache_salt(cache_salt)  # fail before hashing, also when no chunk is full
    _check_block_size("block_size", block_size)
    _check_block_size("chunk_size", chunk_size)
    if chunk_size % block_size:
        raise ValueError(
            f"chunk_size must be a multiple of block_size (got {chunk_size} and {block_size})"
        )
    per_chunk = chunk_size // block_size
    seed = os.environ.get("PYTHONHASHSEED")
    hashes: list[bytes]
    if algo in ("sha256_cbor", "sha256_cbor_64bit") and namespace_info:
        raise ValueError(f"namespace_info is only supported with algo='xxh64' (not {algo!r})")
    if algo == "sha256_cbor":
        if isinstance(lora, int):
            raise ValueError("lora: sha256_cbor takes (name, path), not a LoRA int id")
        hashes = vllm_block_hashes(
            token_ids, block_size, seed=seed, cache_salt=cache_salt or None, lora=lora
        )
    elif algo == "sha256_cbor_64bit":
        if seed is None:
            raise ValueError(
                "PYTHONHASHSEED must be set for algo='sha256_cbor_64bit' (vLLM 0.10 seeds "
                "its hashes from it and picks a random seed without it)"
            )
        if lora is not None and (isinstance(lora, bool) or not isinstance(lora, int)):
            raise ValueError("lora: sha256_cbor_64bit takes the LoRA's int id (lora_int_id)")
        ints = vllm_block_hashes(
            token_ids,
            block_size,
            seed=seed,
            cache_salt=cache_salt or None,
            lora=lora,
            algo="sha256_cbor_64bit",
        )
        hashes = [h.to_bytes(8, "big") for h in ints]
    elif algo == "xxh64":
        if isinstance(lora, int):
            raise ValueError("lora: xxh64 takes (name, path); its name enters the namespace")
        lora_name = lora[0] if lora else None
        ns = build_namespace(lora_name, cache_salt or None, namespace_info)
        hashes = [h.to_bytes(8, "big") for h in flexkv_block_hashes(token_ids, block_size, ns)]
    else:
        raise ValueError(
            f"algo must be 'sha256_cbor', 'sha256_cbor_64bit' or 'xxh64' (got {algo!r})"
        )
    last_blocks = hashes[per_chunk - 1 :: per_chunk]
    return [ObjectKey(model_name, kv_rank, h, cache_salt) for h in last_blocks]
