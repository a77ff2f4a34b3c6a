"""Token -> chunk hashes: vLLM and FlexKV golden vectors, namespace isolation, prefixes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from vectors_util import load, load_local

from flexkv_store.errors import InvalidKeyError
from flexkv_store.keyformat import (
    ObjectKey,
    build_namespace,
    chunk_keys,
    event_int,
    flexkv_block_hashes,
    vllm_block_hashes,
)

BH = load("block_hashes.json")


@pytest.mark.parametrize("case", BH["vllm_sha256_cbor"]["cases"], ids=lambda c: c["case"])
def test_vllm_vectors(case: dict[str, Any]) -> None:
    lora: tuple[str, str] | None = tuple(case["lora"]) if case["lora"] else None  # type: ignore[assignment]
    hashes = vllm_block_hashes(
        case["tokens"],
        case["block_size"],
        seed=case["seed"],
        cache_salt=case["cache_salt"],
        lora=lora,
    )
    assert [h.hex() for h in hashes] == case["block_hashes_hex"]
    assert [event_int(h) for h in hashes] == case["event_ints"]


@pytest.mark.parametrize("case", BH["flexkv_xxh64"]["cases"], ids=lambda c: str(c["namespace"]))
def test_flexkv_vectors(case: dict[str, object]) -> None:
    got = flexkv_block_hashes(case["tokens"], case["tokens_per_block"], case["namespace"])  # type: ignore[arg-type]
    assert got == case["block_hashes_u64"]
    arr = np.asarray(case["tokens"], dtype=np.int32)
    assert flexkv_block_hashes(arr, case["tokens_per_block"], case["namespace"]) == got  # type: ignore[arg-type]


def test_build_namespace_order() -> None:
    assert build_namespace() == []
    assert build_namespace("lora", "salt", ["a", "b"]) == ["lora", "salt", "a", "b"]
    assert build_namespace(None, "salt", "info") == ["salt", "info"]
    assert build_namespace("adapter_A", None, None) == ["adapter_A"]


def test_only_full_blocks_are_hashed() -> None:
    assert vllm_block_hashes(list(range(15)), 16) == []
    assert len(vllm_block_hashes(list(range(33)), 16)) == 2
    assert len(flexkv_block_hashes(list(range(47)), 16)) == 2
    with pytest.raises(ValueError, match="block_size"):
        vllm_block_hashes([1], 0)


tokens = st.lists(st.integers(0, 2**31 - 1), min_size=4, max_size=40)
namespaces = st.lists(st.text(min_size=1, max_size=6), max_size=3)


@given(tokens, namespaces, namespaces)
def test_flexkv_namespaces_isolate(toks: list[int], a: list[str], b: list[str]) -> None:
    ha = flexkv_block_hashes(toks, 4, a)
    hb = flexkv_block_hashes(toks, 4, b)
    if "\x00".join(a) == "\x00".join(b):
        assert ha == hb
    else:
        assert not set(ha) & set(hb)


@given(tokens, st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8))
def test_vllm_salts_isolate(toks: list[int], a: str, b: str) -> None:
    ha = vllm_block_hashes(toks, 4, cache_salt=a)
    hb = vllm_block_hashes(toks, 4, cache_salt=b)
    assert (ha == hb) == (a == b)
    if a != b:
        assert not set(ha) & set(hb)
    assert not set(ha) & set(vllm_block_hashes(toks, 4))


@given(tokens, st.integers(0, 40), namespaces)
def test_prefix_hashes_to_prefix(toks: list[int], cut: int, ns: list[str]) -> None:
    prefix = toks[:cut]
    assert (
        vllm_block_hashes(prefix, 4, cache_salt="s")
        == vllm_block_hashes(toks, 4, cache_salt="s")[: len(prefix) // 4]
    )
    assert (
        flexkv_block_hashes(prefix, 4, ns) == flexkv_block_hashes(toks, 4, ns)[: len(prefix) // 4]
    )


def test_chunk_keys_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    case = BH["vllm_sha256_cbor"]["cases"][4]
    assert case["cache_salt"] == "s1"
    keys = chunk_keys(case["tokens"], model_name="org/m", kv_rank=2, chunk_size=16, cache_salt="s1")
    assert [k.chunk_hash.hex() for k in keys] == case["block_hashes_hex"]
    assert all(k.cache_salt == "s1" and k.model_name == "org/m" and k.kv_rank == 2 for k in keys)
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    seeded = BH["vllm_sha256_cbor"]["cases"][2]
    keys0 = chunk_keys(seeded["tokens"], model_name="m", kv_rank=0, chunk_size=16)
    assert [k.chunk_hash.hex() for k in keys0] == seeded["block_hashes_hex"]


def test_chunk_keys_xxh64() -> None:
    case = next(
        c for c in BH["flexkv_xxh64"]["cases"] if c["namespace"] == ["adapter_A", "session_xyz"]
    )
    keys = chunk_keys(
        case["tokens"],
        model_name="m",
        kv_rank=0,
        chunk_size=case["tokens_per_block"],
        cache_salt="session_xyz",
        lora=("adapter_A", "/loras/a"),
        algo="xxh64",
    )
    assert [int.from_bytes(k.chunk_hash, "big") for k in keys] == case["block_hashes_u64"]
    assert all(len(k.chunk_hash) == 8 for k in keys)


def test_chunk_keys_rejects_bad_input() -> None:
    with pytest.raises(InvalidKeyError):
        chunk_keys([1, 2], model_name="m", kv_rank=0, chunk_size=16, cache_salt="a/b")
    with pytest.raises(InvalidKeyError):
        chunk_keys(list(range(16)), model_name="a@b", kv_rank=0, chunk_size=16)
    with pytest.raises(ValueError, match="algo"):
        chunk_keys([1], model_name="m", kv_rank=0, chunk_size=1, block_size=1, algo="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="namespace_info"):
        chunk_keys([1], model_name="m", kv_rank=0, chunk_size=16, namespace_info="x")
    with pytest.raises(ValueError, match="multiple of block_size"):
        chunk_keys([1], model_name="m", kv_rank=0, chunk_size=24)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_keys([1], model_name="m", kv_rank=0, chunk_size=0)
    with pytest.raises(ValueError, match="lora"):
        chunk_keys([1], model_name="m", kv_rank=0, chunk_size=16, lora=3)
    assert chunk_keys([1], model_name="m", kv_rank=0, chunk_size=1, block_size=1)[0] == ObjectKey(
        "m", 0, vllm_block_hashes([1], 1)[0]
    )


OK = load_local("vllm_offload_keys.json")
V033 = OK["vllm_0_33_sha256_cbor"]
V010 = OK["vllm_0_10_sha256_cbor_64bit"]


def _seed(monkeypatch: pytest.MonkeyPatch, seed: str | None) -> None:
    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)


@pytest.mark.parametrize("case", V033["cases"], ids=lambda c: f"{c['case']}-{len(c['tokens'])}")
def test_chunk_keys_are_vllm_033_offload_keys(
    case: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Golden offload keys made by vLLM 0.33.0's own hasher and make_offload_key."""
    _seed(monkeypatch, case["pythonhashseed"])
    lora = tuple(case["lora"]) if case["lora"] else None
    salt = case["cache_salt"] or ""
    blocks = vllm_block_hashes(
        case["tokens"],
        V033["block_size"],
        seed=case["pythonhashseed"],
        cache_salt=case["cache_salt"],
        lora=lora,
    )
    assert [h.hex() for h in blocks] == case["block_hashes_hex"]
    keys = chunk_keys(
        case["tokens"],
        model_name="Qwen/Qwen3-0.6B",
        kv_rank=7,
        chunk_size=V033["chunk_size"],
        block_size=V033["block_size"],
        cache_salt=salt,
        lora=lora,
    )
    # vLLM's OffloadKey = block hash + 4-byte group index (group 0 here)
    assert [k.chunk_hash.hex() + "00000000" for k in keys] == case["offload_keys_hex"]
    assert all(k.cache_salt == salt and k.kv_rank == 7 for k in keys)
    # a partial chunk at the end has no key
    assert len(keys) == len(case["tokens"]) // V033["chunk_size"]


@pytest.mark.parametrize("case", V010["cases"], ids=lambda c: f"{c['case']}-{len(c['tokens'])}")
def test_sha256_cbor_64bit_matches_vllm_010(
    case: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Golden 64-bit block hashes made by vLLM 0.10.1.1's own hasher."""
    got = vllm_block_hashes(
        case["tokens"],
        V010["block_size"],
        seed=case["pythonhashseed"],
        cache_salt=case["cache_salt"],
        lora=case["lora_int_id"],
        algo="sha256_cbor_64bit",
    )
    assert got == case["block_hashes_u64"]
    _seed(monkeypatch, case["pythonhashseed"])
    keys = chunk_keys(
        case["tokens"],
        model_name="m",
        kv_rank=0,
        chunk_size=32,
        block_size=V010["block_size"],
        cache_salt=case["cache_salt"] or "",
        lora=case["lora_int_id"],
        algo="sha256_cbor_64bit",
    )
    assert [int.from_bytes(k.chunk_hash, "big") for k in keys] == got[1::2]


def test_sha256_cbor_64bit_needs_a_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        chunk_keys(
            list(range(16)), model_name="m", kv_rank=0, chunk_size=16, algo="sha256_cbor_64bit"
        )
    with pytest.raises(ValueError, match="seed"):
        vllm_block_hashes(list(range(16)), 16, algo="sha256_cbor_64bit")
    with pytest.raises(ValueError, match="lora"):
        vllm_block_hashes(list(range(16)), 16, seed="0", lora=("a", "/p"), algo="sha256_cbor_64bit")  # type: ignore[call-overload]


@given(
    tokens=st.lists(st.integers(0, 2**31 - 1), max_size=200),
    per_chunk=st.integers(1, 5),
    salt=st.sampled_from(["", "t1"]),
)
def test_chunk_key_is_last_block_hash(tokens: list[int], per_chunk: int, salt: str) -> None:
    """Keys of chunk_size = k * block_size are every k-th block hash, and a longer chunk
    never keys the same bytes as a shorter one (the chain covers the whole prefix)."""
    blocks = vllm_block_hashes(tokens, 8, cache_salt=salt or None)
    keys = chunk_keys(
        tokens, model_name="m", kv_rank=0, chunk_size=8 * per_chunk, block_size=8, cache_salt=salt
    )
    assert [k.chunk_hash for k in keys] == blocks[per_chunk - 1 :: per_chunk]
