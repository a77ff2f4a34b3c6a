"""Key format speed: wire strings, filenames, framing and chunk hashing.

Each figure stands beside a baseline measured in the same run:
  * key codecs vs. a bare f-string / split with no validation (what LMCache does);
  * frame encode+verify vs. xxh3-64 over the same payload (the checksum floor);
  * chunk hashers vs. hashing the same token bytes in one call.

Usage: python bench/keyformat.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import best_rate, emit, machine, ratio
from flexkv_store.keyformat import (
    ObjectKey,
    decode_header,
    flexkv_block_hashes,
    frame,
    unframe,
    verify_payload,
    vllm_block_hashes,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args(argv)
    t = 0.05 if args.quick else 0.3
    rep = 3 if args.quick else 5

    n = 1000
    keys = [
        ObjectKey("meta-llama/Llama-3-8B", i % 8, os.urandom(32), f"tenant{i % 10}")
        for i in range(n)
    ]
    wires = [k.to_wire() for k in keys]
    names = [k.to_filename() for k in keys]
    raw = [(k.model_name, k.kv_rank, k.chunk_hash, k.cache_salt) for k in keys]

    def to_wire() -> int:
        for k in keys:
            k.to_wire()
        return n

    def baseline_format() -> int:
        for m, r, h, s in raw:
            f"{m}@{r:08x}@{h.hex()}@{s}"
        return n

    def from_wire() -> int:
        for s in wires:
            ObjectKey.from_wire(s)
        return n

    def baseline_split() -> int:
        for s in wires:
            m, r, h, salt = s.split("@")
            (m, int(r, 16), bytes.fromhex(h), salt)
        return n

    def to_filename() -> int:
        for k in keys:
            k.to_filename()
        return n

    def from_filename() -> int:
        for s in names:
            ObjectKey.from_filename(s)
        return n

    def construct() -> int:
        for m, r, h, s in raw:
            ObjectKey(m, r, h, s)
        return n

    codecs: dict[str, Any] = {}
    base_fmt = best_rate(baseline_format, repeat=rep, min_time=t)
    base_split = best_rate(baseline_split, repeat=rep, min_time=t)
    for name, fn, base in (
        ("to_wire", to_wire, base_fmt),
        ("from_wire", from_wire, base_split),
        ("to_filename", to_filename, base_fmt),
        ("from_filename", from_filename, base_split),
        ("construct", construct, base_split),
    ):
        rate = best_rate(fn, repeat=rep, min_time=t)
        codecs[name] = {
            "keys_per_s": round(rate),
            "baseline_keys_per_s": round(base),
            "ratio": ratio(rate, base),
        }
    codecs["_baselines"] = "to_*: bare f-string; from_*/construct: bare split, no validation"

    payload = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    key = keys[0]

    def frame_verify() -> int:
        # What a reader of one contiguous object does: the stored bytes, then unframe.
        head, view = frame(key, payload, padded=True)
        blob = memoryview(bytearray(len(head) + len(view)))
        blob[: len(head)] = head
        blob[len(head) :] = view
        unframe(blob)
        return len(payload)

    def frame_encode_verify_no_copy() -> int:
        head, view = frame(key, payload, padded=True)
        verify_payload(decode_header(head), view)
        return len(payload)

    def baseline_xxh3() -> int:
        xxhash.xxh3_64_intdigest(payload)
        xxhash.xxh3_64_intdigest(payload)
        return len(payload)

    base = best_rate(baseline_xxh3, repeat=rep, min_time=t)
    fr = best_rate(frame_encode_verify_no_copy, repeat=rep, min_time=t)
    fr_copy = best_rate(frame_verify, repeat=rep, min_time=t)
    framing = {
        "payload_bytes": len(payload),
        "encode_verify_gb_s": round(fr / 1e9, 2),
        "encode_copy_verify_gb_s": round(fr_copy / 1e9, 2),
        "baseline_two_xxh3_gb_s": round(base / 1e9, 2),
        "ratio": ratio(fr, base),
    }

    tokens = np.random.default_rng(1).integers(0, 150_000, 16 * 256).tolist()
    token_bytes = np.asarray(tokens, dtype="<i8").tobytes()

    def vllm() -> int:
        vllm_block_hashes(tokens, 16, cache_salt="tenant")
        return len(tokens)

    def flexkv() -> int:
        flexkv_block_hashes(tokens, 16, ["tenant"])
        return len(tokens)

    def base_sha() -> int:
        hashlib.sha256(token_bytes).digest()
        return len(tokens)

    def base_xxh() -> int:
        xxhash.xxh64_intdigest(token_bytes)
        return len(tokens)

    b_sha = best_rate(base_sha, repeat=rep, min_time=t)
    b_xxh = best_rate(base_xxh, repeat=rep, min_time=t)
    v = best_rate(vllm, repeat=rep, min_time=t)
    f = best_rate(flexkv, repeat=rep, min_time=t)
    hashing = {
        "vllm_sha256_cbor_tokens_per_s": round(v),
        "baseline_one_sha256_tokens_per_s": round(b_sha),
        "vllm_ratio": ratio(v, b_sha),
        "flexkv_xxh64_tokens_per_s": round(f),
        "baseline_one_xxh64_tokens_per_s": round(b_xxh),
        "flexkv_ratio": ratio(f, b_xxh),
        "block_size": 16,
    }
    return {
        "bench": "keyformat",
        "machine": machine(),
        "codecs": codecs,
        "framing_4mib": framing,
        "hashing": hashing,
    }


if __name__ == "__main__":
    emit(main())
