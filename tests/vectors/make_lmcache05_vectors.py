"""Regenerate tests/vectors/lmcache05_keys.json with LMCache 0.5.6's own functions.

How the vectors were made (2026-12-02):

    pip download --no-deps lmcache==0.5.6
    pip install --no-deps --target /some/dir lmcache-0.5.6-cp311-*.whl
    PYTHONPATH=/some/dir python tests/vectors/make_lmcache05_vectors.py \\
        tests/vectors/lmcache05_keys.json

Nothing of ours is imported. LMCache's ``ObjectKey`` comes from its own
``lmcache.v1.distributed.api`` (which imports on a CPU-only machine); its L2 adapter
modules pull in GPU platform code at import, so the key functions are taken from their
source files as LMCache ships them (``ast``: the module-level constants and the named
functions, unchanged) and run against that ``ObjectKey``:

- ``l2_adapters/fs_l2_adapter.py``: ``_object_key_to_filename``, ``_filename_to_object_key``
- ``l2_adapters/native_connector_l2_adapter.py``: ``_object_key_to_string`` (the wire form
  of the native connectors: Redis, Valkey, ...)
- ``l2_adapters/s3_l2_adapter.py``: ``_object_key_to_string``, ``_string_to_object_key``
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any

# (model_name, kv_rank, object_group_id, chunk_hash hex, cache_salt)
CASES: list[tuple[str, int, int, str, str]] = [
    ("llama", 42, 0, "deadbeef", ""),
    ("llama", 42, 0x10, "deadbeef", ""),  # reads as a salted 0.4 name: hash 10, salt deadbeef
    ("meta-llama/Llama-3-8B", 0x02010201, 0, "00" * 32, ""),
    ("meta-llama/Llama-3-8B", 0x02010201, 0, "ab" * 32, "alice"),
    ("meta-llama/Llama-3-8B", 0x02010201, 1, "ab" * 32, "alice"),
    ("org/sub/model", 0, 0, "01", "tenant.a b"),
    ("Qwen/Qwen3-32B", 0xFFFFFFFF, 0xDEADBEEF, "0123456789abcdef", "bob"),
    ("m", 7, 0xFFFFFFFFFFFFFFFF, "ff", ""),
    ("./llama-3", 1, 0, "c0ffee", "s"),
    ("模型/名前", 3, 0, "0a0b", "сольт"),
]
# Names LMCache 0.5.6's parser turns away (returns None or raises), and names it accepts
# that our strict, canonical parser refuses (non-canonical spellings of a valid key).
PROBES: list[str] = [
    "llama@0x0000002a@deadbeef.data",  # 3 fields: a 0.4 unsalted name
    "llama@0x0000002a@0@zz.data",
    "llama@0x0000002a@0@deadbeef",  # no .data
    "llama@0x0000002a@0@deadbeef@a@b.data",
    "llama@0x0000002A@0@deadbeef.data",  # upper-case rank
    "llama@0x2a@0@deadbeef.data",  # short rank
    "llama@0x0000002a@00@deadbeef.data",  # leading zero in the group id
    "llama@0x0000002a@A@deadbeef.data",  # upper-case group id
    "llama@0x0000002a@0@DEADBEEF.data",  # upper-case hash
    "llama@0x0000002a@0@abc.data",  # odd hash length
    "llama@0x0000002a@0@deadbeef@.data",  # empty 5th field
]


def _load(path: Path, names: set[str], ns: dict[str, Any]) -> dict[str, Any]:
    """Run ``path``'s simple constants and the functions ``names`` in a copy of ``ns``."""
    tree = ast.parse(path.read_text())
    keep: list[ast.stmt] = []
    for node in tree.body:
        if (isinstance(node, ast.FunctionDef) and node.name in names) or (
            isinstance(node, ast.Assign)
            and all(isinstance(t, ast.Name) and t.id.startswith("_") for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            keep.append(node)
    scope = dict(ns)
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), scope)
    missing = names - scope.keys()
    if missing:
        raise SystemExit(f"{path}: functions not found: {sorted(missing)}")
    return scope


def main(out: str) -> None:
    import lmcache  # type: ignore[import-not-found]
    from lmcache.v1.distributed.api import ObjectKey  # type: ignore[import-not-found]

    root = Path(lmcache.__file__).parent / "v1" / "distributed" / "l2_adapters"
    base: dict[str, Any] = {"ObjectKey": ObjectKey, "Optional": Any, "__name__": "vectors"}
    fs = _load(
        root / "fs_l2_adapter.py", {"_object_key_to_filename", "_filename_to_object_key"}, base
    )
    native = _load(root / "native_connector_l2_adapter.py", {"_object_key_to_string"}, base)
    s3 = _load(root / "s3_l2_adapter.py", {"_object_key_to_string", "_string_to_object_key"}, base)

    valid = []
    for model, rank, group, hexhash, salt in CASES:
        key = ObjectKey(
            chunk_hash=bytes.fromhex(hexhash),
            model_name=model,
            kv_rank=rank,
            object_group_id=group,
            cache_salt=salt,
        )
        filename = fs["_object_key_to_filename"](key)
        wire = native["_object_key_to_string"](key)
        if s3["_object_key_to_string"](key) != wire:
            raise SystemExit(f"LMCache's S3 and native wire forms differ for {key}")
        if (
            fs["_filename_to_object_key"](filename) != key
            or s3["_string_to_object_key"](wire) != key
        ):
            raise SystemExit(f"LMCache's own parsers do not round-trip {key}")
        valid.append(
            {
                "model_name": model,
                "kv_rank": rank,
                "object_group_id": group,
                "chunk_hash_hex": hexhash,
                "cache_salt": salt,
                "filename": filename,
                "wire": wire,
            }
        )
    probes = []
    for name in PROBES:
        got = fs["_filename_to_object_key"](name)
        probes.append(
            {
                "filename": name,
                "lmcache_parses": got is not None,
                "lmcache_key": None
                if got is None
                else {
                    "model_name": got.model_name,
                    "kv_rank": got.kv_rank,
                    "object_group_id": got.object_group_id,
                    "chunk_hash_hex": got.chunk_hash.hex(),
                    "cache_salt": got.cache_salt,
                },
            }
        )
    data = {
        "source": "LMCache 0.5.6 (PyPI wheel): lmcache.v1.distributed.api.ObjectKey with "
        "l2_adapters/fs_l2_adapter.py _object_key_to_filename/_filename_to_object_key, "
        "native_connector_l2_adapter.py and s3_l2_adapter.py _object_key_to_string; "
        "see tests/vectors/make_lmcache05_vectors.py",
        "valid": valid,
        "probes": probes,
    }
    Path(out).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
