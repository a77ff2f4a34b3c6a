"""Regenerate tests/vectors/vllm_offload_keys.json with vLLM's own functions.

How the vectors were made (2026-12-02):

    pip download --no-deps vllm==0.33.0      # and vllm==0.10.1.1
    # a venv with vllm 0.33.0 installed --no-deps (the Makefile's test venv does this)
    python tests/vectors/make_vllm_vectors.py v033 v033.json
    # a second venv with vllm 0.10.1.1 --no-deps (+ diskcache) over the same packages
    python tests/vectors/make_vllm_vectors.py v010 v010.json
    python tests/vectors/make_vllm_vectors.py merge v033.json v010.json \\
        tests/vectors/vllm_offload_keys.json

(vLLM 0.10 logs to stdout, so the output goes to a file.)

Nothing of ours is imported: the hashes come from vLLM's ``Request`` with its own block
hasher (``get_request_block_hasher``, ``init_none_hash``, the release's hash function),
and the 0.33 offload keys from ``make_offload_key`` over the last block hash of each
chunk, as ``offloading/scheduler.py::update_offload_keys`` picks them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TOKENS = [list(range(1, 129)), [(7919 * i) % 50000 for i in range(200)]]
BLOCK_SIZE = 16
CHUNK_SIZE = 64
# (case, PYTHONHASHSEED, cache_salt, lora)
CASES_033: list[tuple[str, str | None, str | None, tuple[str, int, str] | None]] = [
    ("default seed", None, None, None),
    ("PYTHONHASHSEED=0", "0", None, None),
    ("cache_salt", None, "tenant-a", None),
    ("lora + cache_salt", None, "tenant-b", ("adapter_A", 1, "/loras/a")),
]
CASES_010: list[tuple[str, str | None, str | None, tuple[str, int, str] | None]] = [
    ("PYTHONHASHSEED=0", "0", None, None),
    ("PYTHONHASHSEED=42 + cache_salt", "42", "tenant-a", None),
    ("PYTHONHASHSEED=0 + lora id 3 + cache_salt", "0", "tenant-b", ("adapter_A", 3, "/loras/a")),
]


def _request(
    mod: Any, tokens: list[int], salt: str | None, lora: Any, hasher: Any, **extra: Any
) -> Any:
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams

    lreq = None if lora is None else LoRARequest(lora[0], lora[1], lora[2])
    return mod.Request(
        request_id="r",
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        lora_request=lreq,
        cache_salt=salt,
        block_hasher=hasher,
        **extra,
    )


def v033() -> dict[str, Any]:
    import vllm
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1 import request as request_mod
    from vllm.v1.core import kv_cache_utils as kcu
    from vllm.v1.kv_offload.base import make_offload_key

    cases = []
    for name, seed, salt, lora in CASES_033:
        for tokens in TOKENS:
            _set_seed(seed)
            fn = get_hash_fn_by_name("sha256_cbor")
            kcu.init_none_hash(fn)
            req = _request(
                request_mod, tokens, salt, lora, kcu.get_request_block_hasher(BLOCK_SIZE, fn)
            )
            blocks = [bytes(h) for h in req.block_hashes]
            per_chunk = CHUNK_SIZE // BLOCK_SIZE
            keys = [make_offload_key(h, 0) for h in blocks[per_chunk - 1 :: per_chunk]]
            cases.append(
                {
                    "case": name,
                    "pythonhashseed": seed,
                    "tokens": tokens,
                    "cache_salt": salt,
                    "lora": None if lora is None else [lora[0], lora[2]],
                    "block_hashes_hex": [h.hex() for h in blocks],
                    "offload_keys_hex": [k.hex() for k in keys],
                }
            )
    return {
        "source": f"vLLM {vllm.__version__}: Request + get_request_block_hasher(16, "
        "sha256_cbor) + make_offload_key(last block hash of each 64-token chunk, group 0)",
        "block_size": BLOCK_SIZE,
        "chunk_size": CHUNK_SIZE,
        "cases": cases,
    }


def v010() -> dict[str, Any]:
    import vllm
    from vllm import utils as vutils
    from vllm.v1 import request as request_mod
    from vllm.v1.core import kv_cache_utils as kcu

    cases = []
    for name, seed, salt, lora in CASES_010:
        for tokens in TOKENS:
            _set_seed(seed)
            fn = getattr(vutils, "sha256_cbor_64bit")  # noqa: B009 (0.10 only; 0.33 stubs lack it)
            kcu.init_none_hash(fn)
            req = _request(
                request_mod,
                tokens,
                salt,
                lora,
                kcu.get_request_block_hasher(BLOCK_SIZE, fn),
                # 0.10's Request has no defaults for these
                multi_modal_kwargs=None,
                multi_modal_hashes=None,
                multi_modal_placeholders=None,
                eos_token_id=None,
            )
            cases.append(
                {
                    "case": name,
                    "pythonhashseed": seed,
                    "tokens": tokens,
                    "cache_salt": salt,
                    "lora_int_id": None if lora is None else lora[1],
                    "block_hashes_u64": [int(h.hash_value) for h in req.block_hashes],
                }
            )
    return {
        "source": f"vLLM {vllm.__version__}: Request + get_request_block_hasher(16, "
        "sha256_cbor_64bit)",
        "block_size": BLOCK_SIZE,
        "cases": cases,
    }


def _set_seed(seed: str | None) -> None:
    if seed is None:
        os.environ.pop("PYTHONHASHSEED", None)
    else:
        os.environ["PYTHONHASHSEED"] = seed


def main() -> None:
    what, dest = sys.argv[1], sys.argv[-1]
    if what == "v033":
        out = v033()
    elif what == "v010":
        out = v010()
    elif what == "merge":
        with open(sys.argv[2]) as f033, open(sys.argv[3]) as f010:
            out = {
                "note": "made by tests/vectors/make_vllm_vectors.py with vLLM's own functions",
                "vllm_0_33_sha256_cbor": json.load(f033),
                "vllm_0_10_sha256_cbor_64bit": json.load(f010),
            }
    else:
        raise SystemExit("usage: make_vllm_vectors.py v033 OUT | v010 OUT | merge A B OUT")
    with open(dest, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
