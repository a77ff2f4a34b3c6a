"""Object framing: round trips, and every flipped byte or truncation is detected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexkv_store.errors import CorruptObjectError, KeyFormatError
from flexkv_store.keyformat import (
    ALIGN,
    ObjectKey,
    as_bytes_view,
    decode_header,
    encode_header,
    frame,
    header_length,
    unframe,
    verify_payload,
)

KEY = ObjectKey("org/model", 3, b"\xde\xad", "alice")
LONG_KEY = ObjectKey("é" * 256, 0xFFFFFFFF, b"\xab" * 64, "ü" * 128)


def _framed(key: ObjectKey, payload: bytes, padded: bool) -> bytes:
    head, view = frame(key, payload, padded=padded)
    return head + bytes(view)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("key", [KEY, LONG_KEY])
@given(payload=st.binary(max_size=3000))
def test_round_trip(padded: bool, key: ObjectKey, payload: bytes) -> None:
    blob = _framed(key, payload, padded)
    header, view = unframe(blob)
    assert header.key == key
    assert header.payload_len == len(payload)
    assert bytes(view) == payload
    wire_len = len(key.to_wire().encode())
    assert header.header_len == header_length(wire_len, padded=padded)
    if padded:
        assert header.header_len == ALIGN and len(blob) == ALIGN + len(payload)


def test_frame_does_not_copy_the_payload() -> None:
    arr = np.arange(1000, dtype=np.float32)
    head, view = frame(KEY, arr)
    assert np.shares_memory(np.asarray(view), arr)
    assert len(head) == 32 + len(KEY.to_wire())


@pytest.mark.parametrize("padded", [False, True])
@given(payload=st.binary(min_size=0, max_size=200), data=st.data())
def test_any_single_flipped_byte_is_detected(
    padded: bool, payload: bytes, data: st.DataObject
) -> None:
    blob = bytearray(_framed(KEY, payload, padded))
    pos = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    blob[pos] ^= 1 << bit
    with pytest.raises(CorruptObjectError):
        unframe(bytes(blob))


def test_every_position_flipped_small_object() -> None:
    for padded in (False, True):
        blob = _framed(KEY, b"payload!", padded)
        for pos in range(len(blob)):
            bad = bytearray(blob)
            bad[pos] ^= 0x80
            with pytest.raises(CorruptObjectError):
                unframe(bytes(bad))


@pytest.mark.parametrize("padded", [False, True])
@given(payload=st.binary(min_size=1, max_size=300), data=st.data())
def test_truncation_and_extension_detected(
    padded: bool, payload: bytes, data: st.DataObject
) -> None:
    blob = _framed(KEY, payload, padded)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(CorruptObjectError):
        unframe(blob[:cut])
    with pytest.raises(CorruptObjectError):
        unframe(blob + b"\x00")


@given(st.binary(max_size=5000))
def test_arbitrary_bytes_raise_only_corrupt(blob: bytes) -> None:
    try:
        unframe(blob)
    except CorruptObjectError:
        pass


@given(st.binary(max_size=64))
def test_arbitrary_bytes_after_valid_magic(tail: bytes) -> None:
    for blob in (b"FKV1\x01\x00" + tail, b"FKV1\x01\x01" + tail + bytes(ALIGN)):
        try:
            decode_header(blob)
        except (CorruptObjectError, KeyFormatError):
            pass


def test_header_with_an_invalid_key_is_corrupt() -> None:
    head = bytearray(encode_header(KEY, 0, 0))
    # rewrite the key bytes into something that is not a canonical wire key, and re-seal
    import struct

    import xxhash

    wire = b"m@0000000A@00"
    body = struct.pack("<4sBBHQQ", b"FKV1", 1, 0, len(wire), 0, xxhash.xxh3_64_intdigest(b""))
    body += wire
    blob = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    assert head[:4] == blob[:4]
    with pytest.raises(CorruptObjectError, match="not a valid wire key"):
        unframe(blob)


def test_verify_payload_checks_length_and_sum() -> None:
    blob = _framed(KEY, b"abc", False)
    header = decode_header(blob)
    verify_payload(header, b"abc")
    with pytest.raises(CorruptObjectError, match="length"):
        verify_payload(header, b"abcd")
    with pytest.raises(CorruptObjectError, match="checksum"):
        verify_payload(header, b"abd")


def test_buffer_views() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    assert as_bytes_view(t).nbytes == 12
    with pytest.raises(ValueError, match="contiguous"):
        as_bytes_view(t.t())
    with pytest.raises(TypeError):
        as_bytes_view("text")
    with pytest.raises(ValueError, match="contiguous"):
        as_bytes_view(np.arange(10)[::2])
