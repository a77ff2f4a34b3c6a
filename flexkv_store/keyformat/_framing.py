"""Object framing: the header every adapter stores in front of a payload.

Layout (little-endian)::

    offset  size  field
    0       4     magic  b"FKV1"
    4       1     format version (1)
    5       1     flags (bit 0: header padded to ALIGN bytes)
    6       2     key length K (UTF-8 bytes of the wire key)
    8       8     payload length
    16      8     xxh3-64 of the payload
    24      K     wire key (UTF-8)
    24+K    8     xxh3-64 of bytes 0 .. 24+K (guards the header itself)
    32+K    ...   zero padding up to ALIGN bytes (padded variant only)

The payload checksum guards the payload, the header checksum guards lengths, flags and
key, and the padding must be zeros, so any single flipped byte or truncation is detected.
The padded variant keeps payloads 4096-aligned inside files for O_DIRECT.

Framing never copies the payload: :func:`frame` returns the header and a view of the
payload as two buffers for vectored writes, and :func:`unframe` verifies in place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import xxhash

from flexkv_store.errors import CorruptObjectError, InvalidKeyError
from flexkv_store.keyformat._key import ObjectKey

__all__ = [
    "ALIGN",
    "FrameHeader",
    "MAGIC",
    "as_bytes_view",
    "checksum",
    "decode_header",
    "encode_header",
    "frame",
    "header_key_length",
    "header_length",
    "unframe",
    "verify_payload",
]

MAGIC: Final = b"FKV1"
VERSION: Final = 1
ALIGN: Final = 4096
FLAG_PADDED: Final = 0x01
_FIXED = struct.Struct("<4sBBHQQ")
_TAIL = struct.Struct("<Q")
FIXED_LEN: Final = _FIXED.size  # 24
MIN_HEADER_LEN: Final = FIXED_LEN + _TAIL.size  # 32
_ZEROS = bytes(ALIGN)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded, verified header: the key, payload length and checksum, header length."""

    key: ObjectKey
    payload_len: int
    checksum: int
    header_len: int


def as_bytes_view(data: object) -> memoryview:
    """A flat, C-contiguous byte view of any buffer (bytes, numpy array, CPU tensor)."""
    if isinstance(data, memoryview):
        mv = data
    elif isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    else:
        try:
            mv = memoryview(data)  # type: ignore[arg-type]
        except TypeError:
            # torch tensors do not export the buffer protocol; numpy() shares memory.
            numpy = getattr(data, "numpy", None)
            if numpy is None:
                raise TypeError(
                    f"data must be a buffer (bytes, memoryview, numpy array, CPU tensor), "
                    f"not {type(data).__name__}"
                ) from None
            if getattr(data, "is_cuda", False):
                raise TypeError("CUDA tensors are only accepted by the gds adapter") from None
            if not data.is_contiguous():  # type: ignore[attr-defined]
                raise ValueError("tensor must be contiguous") from None
            import torch  # already imported by whoever made the tensor

            flat = data.detach().reshape(-1).view(torch.uint8)  # type: ignore[attr-defined]
            mv = memoryview(flat.numpy())
    if not mv.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def checksum(payload: memoryview | bytes) -> int:
    """xxh3-64 of the payload."""
    return xxhash.xxh3_64_intdigest(payload)


def header_length(key_len: int, *, padded: bool) -> int:
    """Bytes taken by a header for a wire key of ``key_len`` UTF-8 bytes."""
    return ALIGN if padded else MIN_HEADER_LEN + key_len


def encode_header(
    key: ObjectKey, payload_len: int, payload_checksum: int, *, padded: bool = False
) -> bytes:
    """Build a header for ``key`` and a payload of the given length and checksum."""
    wire = key.to_wire().encode("utf-8")
    head = (
        _FIXED.pack(
            MAGIC, VERSION, FLAG_PADDED if padded else 0, len(wire), payload_len, payload_checksum
        )
        + wire
    )
    head += _TAIL.pack(xxhash.xxh3_64_intdigest(head))
    if padded:
        head += _ZEROS[: ALIGN - len(head)]
    return head


def frame(key: ObjectKey, data: object, *, padded: bool = False) -> tuple[bytes, memoryview]:
    """Header and payload view of ``data``, for a two-buffer (vectored) write."""
    payload = as_bytes_view(data)
    return encode_header(key, payload.nbytes, checksum(payload), padded=padded), payload


def header_key_length(buf: bytes | bytearray | memoryview) -> int | None:
    """The key length a header claims (bytes 6-7), or None when ``buf`` is not ours.

    Read before decoding, so that a header naming a longer key than expected is recognised
    as another key's (not as a truncated header of ours) from a prefix of the object.
    """
    if len(buf) < FIXED_LEN or bytes(buf[: len(MAGIC)]) != MAGIC:
        return None
    return int.from_bytes(bytes(buf[6:8]), "little")


def decode_header(buf: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and verify the header at the start of ``buf``.

    ``buf`` must hold at least the whole header (4096 bytes for padded headers; for plain
    headers, 24 bytes tell the length). Raises :class:`CorruptObjectError` on any mismatch.
    """
    mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
    if mv.nbytes < MIN_HEADER_LEN:
        raise CorruptObjectError(f"object shorter than a header ({mv.nbytes} bytes)")
    magic, version, flags, key_len, payload_len, payload_sum = _FIXED.unpack_from(mv)
    if magic != MAGIC:
        raise CorruptObjectError("bad magic: not a flexkv-store object")
    if version != VERSION:
        raise CorruptObjectError(f"unsupported format version {version}")
    if flags & ~FLAG_PADDED:
        raise CorruptObjectError(f"unknown header flags 0x{flags:02x}")
    padded = bool(flags & FLAG_PADDED)
    body_end = FIXED_LEN + key_len
    hlen = header_length(key_len, padded=padded)
    if body_end + _TAIL.size > hlen or mv.nbytes < hlen:
        raise CorruptObjectError("header truncated or key length out of range")
    (stored,) = _TAIL.unpack_from(mv, body_end)
    if xxhash.xxh3_64_intdigest(mv[:body_end]) != stored:
        raise CorruptObjectError("header checksum mismatch")
    pad_start = body_end + _TAIL.size
    if padded and mv[pad_start:hlen] != _ZEROS[: hlen - pad_start]:
        raise CorruptObjectError("header padding is not zero")
    try:
        key = ObjectKey.from_wire(bytes(mv[FIXED_LEN:body_end]).decode("utf-8"))
    except (UnicodeDecodeError, InvalidKeyError) as exc:
        raise CorruptObjectError(f"header key is not a valid wire key: {exc}") from None
    return FrameHeader(key, payload_len, payload_sum, hlen)


def verify_payload(header: FrameHeader, payload: bytes | bytearray | memoryview) -> None:
    """Check the payload's length and checksum against ``header``."""
    n = memoryview(payload).nbytes
    if n != header.payload_len:
        raise CorruptObjectError(
            f"payload length {n} does not match the header's {header.payload_len}"
        )
    if checksum(payload if isinstance(payload, bytes) else memoryview(payload).cast("B")) != (
        header.checksum
    ):
        raise CorruptObjectError("payload checksum mismatch")


def unframe(buf: bytes | bytearray | memoryview) -> tuple[FrameHeader, memoryview]:
    """Decode and verify a whole framed object; returns the header and a payload view."""
    header = decode_header(buf)
    mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
    payload = mv[header.header_len :]
    verify_payload(header, payload)
    return header, payload
