"""ObjectKey rules, wire strings and filenames: golden vectors and properties."""

from __future__ import annotations

import hashlib
import pickle
import unicodedata

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from vectors_util import LOCAL, SHARED, load, load_local

from flexkv_store.errors import InvalidKeyError, KeyFormatError
from flexkv_store.keyformat import (
    NAME_MAX,
    ObjectKey,
    from_filename,
    from_filename_v05,
    from_wire,
    from_wire_v05,
    to_filename,
    to_filename_v05,
    to_wire,
    to_wire_v05,
)

KF = load("keyformat.json")
BANNED = {"Cc", "Cf", "Cs", "Zl", "Zp"}
FIELDS = ("model_name", "kv_rank", "chunk_hash", "cache_salt")


def _key_of(case: dict[str, object]) -> ObjectKey:
    return ObjectKey(
        case["model_name"],  # type: ignore[arg-type]
        case["kv_rank"],  # type: ignore[arg-type]
        bytes.fromhex(case["chunk_hash_hex"]),  # type: ignore[arg-type]
        case["cache_salt"],  # type: ignore[arg-type]
    )


def _field_named_in(why: str) -> str:
    named = [f for f in FIELDS if f in why]
    if not named and "_default" in why:
        return "cache_salt"
    assert len(named) == 1, why
    return named[0]


# -- golden vectors --------------------------------------------------------------------


def test_vector_copy_matches_shared() -> None:
    if not SHARED.exists():
        pytest.skip("no ../shared/vectors beside this checkout")
    for name in ("keyformat.json", "block_hashes.json"):
        assert (SHARED / name).read_bytes() == (LOCAL / name).read_bytes(), name


@pytest.mark.parametrize("case", KF["valid"], ids=lambda c: c["wire"][:40])
def test_valid_vectors(case: dict[str, object]) -> None:
    key = _key_of(case)
    assert key.to_wire() == case["wire"]
    assert to_wire(key) == case["wire"]
    assert key.to_filename() == case["filename"]
    assert to_filename(key) == case["filename"]
    assert from_wire(case["wire"]) == key  # type: ignore[arg-type]
    if case.get("filename_overlong"):
        assert key.filename_is_overlong
        with pytest.raises(KeyFormatError):
            from_filename(case["filename"])  # type: ignore[arg-type]
    else:
        assert not key.filename_is_overlong
        assert from_filename(case["filename"]) == key  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "case", KF["invalid"] + KF["invalid_ours"], ids=lambda c: c["why"].replace(" ", "_")
)
def test_invalid_vectors(case: dict[str, object]) -> None:
    with pytest.raises(InvalidKeyError) as info:
        _key_of(case)
    assert info.value.field == _field_named_in(str(case["why"]))
    assert info.value.field in str(info.value)


@pytest.mark.parametrize("s", KF["invalid_strings"]["wire"])
def test_invalid_wire_strings(s: str) -> None:
    with pytest.raises(KeyFormatError):
        from_wire(s)


@pytest.mark.parametrize("s", KF["invalid_strings"]["filename"])
def test_invalid_filenames(s: str) -> None:
    with pytest.raises(KeyFormatError):
        from_filename(s)


# -- strategies ------------------------------------------------------------------------

_name_chars = st.characters(blacklist_categories=tuple(BANNED), blacklist_characters="@\\")  # type: ignore[arg-type]
_salt_chars = st.characters(blacklist_categories=tuple(BANNED), blacklist_characters="@/\\")  # type: ignore[arg-type]


def _valid_model(name: str) -> bool:
    n = len(name.encode("utf-8"))
    return 1 <= n <= 512 and "-SEP-" not in name and "-SEP/" not in name


model_names = st.one_of(
    st.text(_name_chars, min_size=1, max_size=40),
    st.text(st.sampled_from("-SEP/ab"), min_size=1, max_size=30),
    # boundary lengths: exactly 512 bytes in 1-, 2- and 4-byte characters
    st.sampled_from(["m" * 512, "é" * 256, "𝔐" * 128, "a/" * 255 + "bc"]),
    st.text(_name_chars, min_size=120, max_size=200),
).filter(_valid_model)
salts = st.one_of(
    st.just(""),
    st.text(_salt_chars, min_size=1, max_size=20),
    st.text(_salt_chars, min_size=128, max_size=128),
    st.sampled_from([".", "..", "tenant A", "ü-salt", "x" * 128]),
).filter(lambda s: s != "_default")
keys = st.builds(
    ObjectKey,
    model_names,
    st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 0xFFFFFFFF])),
    st.binary(min_size=1, max_size=64),
    salts,
)


# -- round trips -----------------------------------------------------------------------


@given(keys)
def test_wire_round_trip(key: ObjectKey) -> None:
    s = key.to_wire()
    assert from_wire(s) == key
    assert from_wire(s).to_wire() == s


@given(keys)
def test_filename_round_trip(key: ObjectKey) -> None:
    name = key.to_filename()
    if len(name.encode("utf-8")) > NAME_MAX or name.startswith("h-"):
        assert name == f"h-{hashlib.sha256(key.to_wire().encode()).hexdigest()}.data"
        assert "@" not in name and len(name) == 71
        with pytest.raises(KeyFormatError):
            from_filename(name)
    else:
        assert "/" not in name
        assert from_filename(name) == key


@given(keys)
def test_plain_filenames_fit_name_max(key: ObjectKey) -> None:
    assert len(key.to_filename().encode("utf-8")) <= NAME_MAX


@given(keys, keys)
def test_equality_and_hash_cover_all_fields(a: ObjectKey, b: ObjectKey) -> None:
    same = (a.model_name, a.kv_rank, a.chunk_hash, a.cache_salt) == (
        b.model_name,
        b.kv_rank,
        b.chunk_hash,
        b.cache_salt,
    )
    assert (a == b) == same
    if same:
        assert hash(a) == hash(b)
    assert (a.to_wire() == b.to_wire()) == same


@given(st.text(st.sampled_from("-SEP/ab"), min_size=1, max_size=24), st.data())
def test_no_two_model_names_share_a_filename(a: str, data: st.DataObject) -> None:
    assume(_valid_model(a))
    b = data.draw(st.text(st.sampled_from("-SEP/ab"), min_size=1, max_size=24))
    assume(_valid_model(b) and a != b)
    ka, kb = ObjectKey(a, 0, b"\x00"), ObjectKey(b, 0, b"\x00")
    assert ka.to_filename() != kb.to_filename()


@pytest.mark.parametrize(("a", "b"), [("x/SEP-", "x-SEP/"), ("a/b", "a-SEP-b"), ("/", "-SEP-")])
def test_sep_collisions_are_prevented(a: str, b: str) -> None:
    ka = ObjectKey(a, 0, b"\x00")
    with pytest.raises(InvalidKeyError) as info:
        ObjectKey(b, 0, b"\x00")
    assert info.value.field == "model_name"
    assert from_filename(ka.to_filename()) == ka


@given(st.text(st.sampled_from("m@0123456789abcdefx_A-/é\x00"), max_size=40))
@example("m@0000002a@00")
@example("m@0000002a@00@s")
def test_accepted_wire_strings_are_canonical(s: str) -> None:
    try:
        key = from_wire(s)
    except KeyFormatError:
        return
    assert key.to_wire() == s


@given(st.text(st.sampled_from("m@0x123456789abcdef_-SEP.data/é"), max_size=50))
@example("m@0x0000002a@00.data")
@example("a-SEP-b@0x0000002a@00@s.data")
def test_accepted_filenames_are_canonical(s: str) -> None:
    try:
        key = from_filename(s)
    except KeyFormatError:
        return
    assert key.to_filename() == s


@given(st.one_of(st.text(), st.binary(), st.integers(), st.none()))
def test_parsing_arbitrary_input_raises_only_key_format_errors(value: object) -> None:
    for parse in (from_wire, from_filename):
        try:
            parse(value)  # type: ignore[arg-type]
        except KeyFormatError:
            pass


@given(keys, st.data())
def test_mutated_wire_strings_parse_canonically_or_fail_cleanly(
    key: ObjectKey, data: st.DataObject
) -> None:
    s = key.to_wire()
    i = data.draw(st.integers(0, len(s)))
    ch = data.draw(st.sampled_from(["@", "A", "0", "\n", "", "/", "x"]))
    mutated = s[:i] + ch + s[i + 1 :]
    try:
        parsed = from_wire(mutated)
    except KeyFormatError:
        return
    assert parsed.to_wire() == mutated


# -- each rule on its own --------------------------------------------------------------

BAD_FIELD_VALUES: list[tuple[str, object]] = [
    ("model_name", ""),
    ("model_name", "m" * 513),
    ("model_name", "é" * 257),
    ("model_name", "a@b"),
    ("model_name", "a\\b"),
    ("model_name", "a\x00b"),
    ("model_name", "a\nb"),
    ("model_name", "a\u200bb"),
    ("model_name", "a\u202eb"),
    ("model_name", "a\u2028b"),
    ("model_name", "a\u2029b"),
    ("model_name", "a\ud800b"),
    ("model_name", "a-SEP-b"),
    ("model_name", "a-SEP/b"),
    ("model_name", b"bytes"),
    ("model_name", None),
    ("kv_rank", -1),
    ("kv_rank", 0x1_0000_0000),
    ("kv_rank", True),
    ("kv_rank", 1.0),
    ("kv_rank", "1"),
    ("chunk_hash", b""),
    ("chunk_hash", b"\x00" * 65),
    ("chunk_hash", "00"),
    ("chunk_hash", 7),
    ("cache_salt", "s" * 129),
    ("cache_salt", "a@b"),
    ("cache_salt", "a/b"),
    ("cache_salt", "a\\b"),
    ("cache_salt", "a\x00b"),
    ("cache_salt", "\x7f"),
    ("cache_salt", "a\u200fb"),
    ("cache_salt", "_default"),
    ("cache_salt", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELD_VALUES)
def test_each_rule_alone_is_rejected_naming_the_field(field: str, value: object) -> None:
    good: dict[str, object] = {
        "model_name": "m",
        "kv_rank": 0,
        "chunk_hash": b"\x01",
        "cache_salt": "s",
    }
    good[field] = value
    with pytest.raises(InvalidKeyError) as info:
        ObjectKey(**good)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(field)


@given(keys, st.sampled_from(sorted(BANNED)), st.data())
def test_banned_categories_rejected_anywhere(key: ObjectKey, cat: str, data: st.DataObject) -> None:
    ch = data.draw(st.characters(whitelist_categories=(cat,)))  # type: ignore[arg-type]
    assert unicodedata.category(ch) == cat
    name = key.model_name[:10] + ch
    with pytest.raises(InvalidKeyError) as info:
        ObjectKey(name, key.kv_rank, key.chunk_hash, key.cache_salt)
    assert info.value.field == "model_name"
    with pytest.raises(InvalidKeyError) as info:
        ObjectKey(key.model_name, key.kv_rank, key.chunk_hash, "s" + ch)
    assert info.value.field == "cache_salt"


def test_bytes_like_hash_is_copied() -> None:
    buf = bytearray(b"\x01\x02")
    key = ObjectKey("m", 0, buf)  # type: ignore[arg-type]
    buf[0] = 9
    assert key.chunk_hash == b"\x01\x02" and type(key.chunk_hash) is bytes
    assert ObjectKey("m", 0, memoryview(b"\x03")).chunk_hash == b"\x03"  # type: ignore[arg-type]


def test_valid_salts_from_the_design() -> None:
    for salt in (".", "..", "tenant A", "ü-salt", "x" * 128):
        assert from_wire(ObjectKey("m", 0, b"\x00", salt).to_wire()).cache_salt == salt


def test_immutable_picklable_repr() -> None:
    key = ObjectKey("org/m", 7, b"\xab", "alice")
    with pytest.raises(AttributeError):
        key.kv_rank = 8  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(key)) == key
    assert eval(repr(key)) == key
    assert key.replace(cache_salt="bob") == ObjectKey("org/m", 7, b"\xab", "bob")
    assert len({key, ObjectKey("org/m", 7, b"\xab", "alice"), key.replace(cache_salt="")}) == 2


# -- LMCache 0.4.7-0.5.x names (object_group_id) -----------------------------------------

V05 = load_local("lmcache05_keys.json")
groups = st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.sampled_from([1, 0x10, 2**64 - 1]))


@pytest.mark.parametrize("case", V05["valid"], ids=lambda c: c["filename"][:48])
def test_v05_vectors(case: dict[str, object]) -> None:
    key, group = _key_of(case), case["object_group_id"]
    assert to_filename_v05(key, group) == case["filename"]  # type: ignore[arg-type]
    assert to_wire_v05(key, group) == case["wire"]  # type: ignore[arg-type]
    assert from_filename_v05(case["filename"]) == (key, group)  # type: ignore[arg-type]
    assert from_wire_v05(case["wire"]) == (key, group)  # type: ignore[arg-type]


@pytest.mark.parametrize("probe", V05["probes"], ids=lambda p: p["filename"][:48])
def test_v05_probes_parse_only_in_canonical_form(probe: dict[str, object]) -> None:
    # What LMCache 0.5.6 refuses we refuse; what it accepts we accept only when the name is
    # the canonical one of the key it reads (upper case, short ranks, leading zeros: no).
    name = probe["filename"]
    assert isinstance(name, str)
    try:
        key, group = from_filename_v05(name)
    except KeyFormatError:
        return
    assert probe["lmcache_parses"]
    assert to_filename_v05(key, group) == name


def test_v05_and_v04_names_are_read_as_declared() -> None:
    # The issue's example: LMCache 0.5's group 0x10, hash deadbeef, unsalted ...
    name = "llama@0x0000002a@10@deadbeef.data"
    assert from_filename_v05(name) == (ObjectKey("llama", 42, bytes.fromhex("deadbeef")), 0x10)
    # ... is also a well-formed 0.4 name (hash 10, salt deadbeef): the same bytes are two
    # different keys, which is why a raw directory declares its generation.
    assert from_filename(name) == ObjectKey("llama", 42, b"\x10", "deadbeef")
    # A 0.4 unsalted name is never a 0.5 one, and a 0.5 name of group 0 never a 0.4 one.
    with pytest.raises(KeyFormatError, match="4 or 5"):
        from_filename_v05("llama@0x0000002a@deadbeef.data")
    with pytest.raises(KeyFormatError, match="chunk_hash"):
        from_filename("llama@0x0000002a@0@deadbeef.data")


@given(keys, groups)
def test_v05_round_trips(key: ObjectKey, group: int) -> None:
    assert from_wire_v05(to_wire_v05(key, group)) == (key, group)
    name = to_filename_v05(key, group)
    assert from_filename_v05(name) == (key, group)
    assert "/" not in name


@given(st.text(st.sampled_from("m@0x123456789abcdef_-SEP.data/é"), max_size=50))
@example("m@0x0000002a@0@00.data")
@example("a-SEP-b@0x0000002a@1f@00@s.data")
def test_v05_accepted_names_are_canonical(s: str) -> None:
    for parse, unparse in ((from_filename_v05, to_filename_v05), (from_wire_v05, to_wire_v05)):
        try:
            key, group = parse(s)
        except KeyFormatError:
            continue
        assert unparse(key, group) == s


@given(st.one_of(st.text(), st.binary(), st.integers(), st.none()))
def test_v05_parsing_arbitrary_input_raises_only_key_format_errors(value: object) -> None:
    for parse in (from_wire_v05, from_filename_v05):
        try:
            parse(value)  # type: ignore[arg-type]
        except KeyFormatError:
            pass


@pytest.mark.parametrize("group", [-1, 2**64, True, 1.0, "0"])
def test_v05_group_id_rules(group: object) -> None:
    key = ObjectKey("m", 0, b"\x00")
    with pytest.raises(InvalidKeyError) as info:
        to_filename_v05(key, group)  # type: ignore[arg-type]
    assert info.value.field == "object_group_id"
    with pytest.raises(KeyFormatError, match="object_group_id"):
        from_wire_v05("m@00000000@10000000000000000@00")  # 2**64 does not fit


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("m@0x0000002a@0@00@_default.data", "cache_salt"),
        ("a@b@0x0000002a@0@00.data", "filename"),
        ("m/x@0x0000002a@0@00.data", "filename"),  # "/" is spelled -SEP- in filenames
        ("m\x00@0x0000002a@0@00.data", "model_name"),
    ],
)
def test_v05_key_rules_apply(name: str, field: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        from_filename_v05(name)
    assert info.value.field == field
