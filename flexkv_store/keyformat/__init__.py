"""Keys: :class:`ObjectKey`, its wire string and filename, object framing, chunk hashing.

See DESIGN section 2. The wire string and filename are byte-compatible with LMCache
0.4.4-0.4.6; parsing is strict and canonical. The ``*_v05`` functions read and write
LMCache 0.4.7-0.5.x's forms, which add an ``object_group_id`` field (DESIGN section 14).
"""

from __future__ import annotations

from flexkv_store.keyformat._framing import (
    ALIGN,
    FrameHeader,
    as_bytes_view,
    checksum,
    decode_header,
    encode_header,
    frame,
    header_length,
    unframe,
    verify_payload,
)
from flexkv_store.keyformat._key import (
    NAME_MAX,
    ObjectKey,
    check_cache_salt,
    from_filename_v05,
    from_wire_v05,
    overlong_filename,
    to_filename_v05,
    to_wire_v05,
)
from flexkv_store.keyformat.hashing import (
    build_namespace,
    chunk_keys,
    event_int,
    flexkv_block_hashes,
    vllm_block_hashes,
)

__all__ = [
    "ALIGN",
    "FrameHeader",
    "NAME_MAX",
    "ObjectKey",
    "as_bytes_view",
    "build_namespace",
    "check_cache_salt",
    "checksum",
    "chunk_keys",
    "decode_header",
    "encode_header",
    "event_int",
    "flexkv_block_hashes",
    "frame",
    "from_filename",
    "from_filename_v05",
    "from_wire",
    "from_wire_v05",
    "header_length",
    "overlong_filename",
    "to_filename",
    "to_filename_v05",
    "to_wire",
    "to_wire_v05",
    "unframe",
    "verify_payload",
    "vllm_block_hashes",
]

from_wire = ObjectKey.from_wire
from_filename = ObjectKey.from_filename


def to_wire(key: ObjectKey) -> str:
    """Module-level alias of :meth:`ObjectKey.to_wire`."""
    return key.to_wire()


def to_filename(key: ObjectKey) -> str:
    """Module-level alias of :meth:`ObjectKey.to_filename`."""
    return key.to_filename()
