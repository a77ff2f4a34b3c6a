"""Token ids -> chunk hashes, with namespace isolation.

Two schemes, each matching its peer bit for bit (golden cases in the shared vectors):

* :func:`vllm_block_hashes` — vLLM's prefix-cache hashes (``sha256_cbor``), so that vLLM's
  KV events and our keys agree.
* :func:`flexkv_block_hashes` — FlexKV's cumulative XXH64 over namespace and tokens.

In both, a different namespace (cache salt, LoRA, extra namespace info) changes every
hash, and a prefix of a token sequence hashes to a prefix of the hashes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, Literal

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


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _check_block_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int (got {value!r})")


def _as_token_list(token_ids: Sequence[int] | np.ndarray[Any, Any]) -> list[int]:
    if isinstance(token_ids, np.ndarray):
        return [int(t) for t in token_ids.reshape(-1).tolist()]
    return [int(t) for t in token_ids]


def vllm_block_hashes(
    token_ids: Sequence[int] | np.ndarray[Any, Any],
    block_size: int,
    *,
    seed: str = DEFAULT_VLLM_SEED,
    cache_salt: str | None = None,
    lora: tuple[str, str] | Sequence[str] | None = None,
) -> list[bytes]:
    """vLLM (>= 0.31) prefix-cache block hashes with the ``sha256_cbor`` algorithm.

    ``NONE_HASH = sha256(cbor(seed))``; block ``i`` hashes
    ``(parent or NONE_HASH, tuple(block_tokens), extra)`` with canonical CBOR, where
    ``extra`` holds ``("lora", name, path)`` on every block when ``lora`` is given and
    ``("cache_salt", salt)`` on block 0 only, or is ``None``. Only full blocks are hashed.
    """
    _check_block_size("block_size", block_size)
    tokens = _as_token_list(token_ids)
    parent = _sha256_cbor(seed)
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


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray[Any, Any],
    *,
    model_name: str,
    kv_rank: int,
    chunk_size: int,
    cache_salt: str = "",
    lora: tuple[str, str] | Sequence[str] | None = None,
    namespace_info: str | Sequence[str] | None = None,
    algo: Literal["sha256_cbor", "xxh64"] = "sha256_cbor",
) -> list[ObjectKey]:
    """One :class:`ObjectKey` per full chunk of ``token_ids``.

    The salt both enters the hash and becomes the key's ``cache_salt``. ``sha256_cbor``
    uses :func:`vllm_block_hashes` with the seed vLLM uses (``PYTHONHASHSEED`` when set);
    ``namespace_info`` has no place in vLLM's scheme and is rejected there. ``xxh64``
    uses :func:`flexkv_block_hashes` over :func:`build_namespace` and stores the 8-byte
    big-endian digest.
    """
    check_cache_salt(cache_salt)  # fail before hashing, also when no chunk is full
    if algo == "sha256_cbor":
        if namespace_info:
            raise ValueError("namespace_info is only supported with algo='xxh64'")
        seed = os.environ.get("PYTHONHASHSEED")
        hashes = vllm_block_hashes(
            token_ids,
            chunk_size,
            seed=DEFAULT_VLLM_SEED if seed is None else seed,
            cache_salt=cache_salt or None,
            lora=lora,
        )
    elif algo == "xxh64":
        lora_name = lora[0] if lora else None
        ns = build_namespace(lora_name, cache_salt or None, namespace_info)
        hashes = [h.to_bytes(8, "big") for h in flexkv_block_hashes(token_ids, chunk_size, ns)]
    else:
        raise ValueError(f"algo must be 'sha256_cbor' or 'xxh64' (got {algo!r})")
    return [ObjectKey(model_name, kv_rank, h, cache_salt) for h in hashes]
