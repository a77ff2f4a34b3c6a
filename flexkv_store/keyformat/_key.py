"""`ObjectKey` and its two string forms: the wire string and the filename."""

from __future__ import annotations

import collections
import hashlib
import operator
import re
import unicodedata
from typing import TYPE_CHECKING, Any, Final

from flexkv_store.errors import InvalidKeyError, KeyFormatError

__all__ = [
    "NAME_MAX",
    "ObjectKey",
    "from_filename_v05",
    "from_wire_v05",
    "to_filename_v05",
    "to_wire_v05",
]

#: Longest filename (bytes) most Linux filesystems accept; longer names use the hashed form.
NAME_MAX: Final = 255
MODEL_NAME_MAX_BYTES: Final = 512
CACHE_SALT_MAX_CHARS: Final = 128
CHUNK_HASH_MAX_BYTES: Final = 64
KV_RANK_MAX: Final = 0xFFFFFFFF
DEFAULT_SALT_ALIAS: Final = "_default"

# Unicode categories banned in names and salts: control, format (bidi marks, zero-width),
# surrogates, line and paragraph separators. They make keys that look alike but differ.
_BANNED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_ASCII_BAD_MODEL: Final = re.compile(r"[@\\\x00-\x1f\x7f]")
_ASCII_BAD_SALT: Final = re.compile(r"[@/\\\x00-\x1f\x7f]")
_RANK_WIRE: Final = re.compile(r"[0-9a-f]{8}")
_RANK_FILE: Final = re.compile(r"0x[0-9a-f]{8}")
_HASH_HEX: Final = re.compile(r"(?:[0-9a-f]{2}){1,64}")
#: LMCache 0.5's object_group_id as ``f"{ogid:x}"`` writes it: no leading zeros, 64 bits.
_GROUP_HEX: Final = re.compile(r"0|[1-9a-f][0-9a-f]{0,15}")
GROUP_ID_MAX: Final = (1 << 64) - 1
_SEP: Final = "-SEP-"

# namedtuple's C field descriptor where the interpreter has one (CPython), else a property.
_field: Any = getattr(collections, "_tuplegetter", None) or (
    lambda index, doc: property(operator.itemgetter(index), doc=doc)
)
_new_tuple: Final = tuple.__new__


def _bad_char(text: str, banned: str) -> str | None:
    """Describe the first banned character of ``text``, or return None."""
    for ch in text:
        if ch in banned:
            return f"must not contain {ch!r}"
        cat = unicodedata.category(ch)
        if cat in _BANNED_CATEGORIES:
            return (
                f"must not contain control or invisible characters (found U+{ord(ch):04X}, {cat})"
            )
    return None


def _check_model_name(model_name: object) -> str:
    if type(model_name) is not str:
        if not isinstance(model_name, str):
            raise InvalidKeyError("model_name", f"must be a str, not {type(model_name).__name__}")
        model_name = str(model_name)
    if model_name.isascii():
        n = len(model_name)
        if _ASCII_BAD_MODEL.search(model_name):
            problem = _bad_char(model_name, "@\\")
            raise InvalidKeyError("model_name", problem or "invalid character")
    else:
        problem = _bad_char(model_name, "@\\")
        if problem:
            raise InvalidKeyError("model_name", problem)
        n = len(model_name.encode("utf-8"))
    if n == 0:
        raise InvalidKeyError("model_name", "must not be empty")
    if n > MODEL_NAME_MAX_BYTES:
        raise InvalidKeyError(
            "model_name", f"must be at most {MODEL_NAME_MAX_BYTES} UTF-8 bytes (got {n})"
        )
    if "-SEP" in model_name and (_SEP in model_name or "-SEP/" in model_name):
        raise InvalidKeyError(
            "model_name",
            "must not contain '-SEP-' or '-SEP/' (they would make two names share a filename)",
        )
    return model_name


def _check_kv_rank(kv_rank: object) -> int:
    if type(kv_rank) is not int:
        if isinstance(kv_rank, bool) or not isinstance(kv_rank, int):
            raise InvalidKeyError("kv_rank", f"must be an int, not {type(kv_rank).__name__}")
        kv_rank = int(kv_rank)
    if not 0 <= kv_rank <= KV_RANK_MAX:
        raise InvalidKeyError("kv_rank", f"must be in 0..0xFFFFFFFF (got {kv_rank})")
    return kv_rank


def _check_chunk_hash(chunk_hash: object) -> bytes:
    if type(chunk_hash) is not bytes:
        if isinstance(chunk_hash, (bytes, bytearray, memoryview)):
            chunk_hash = bytes(chunk_hash)
        else:
            raise InvalidKeyError(
                "chunk_hash", f"must be bytes-like, not {type(chunk_hash).__name__}"
            )
    n = len(chunk_hash)
    if not 1 <= n <= CHUNK_HASH_MAX_BYTES:
        raise InvalidKeyError(
            "chunk_hash", f"must be 1..{CHUNK_HASH_MAX_BYTES} bytes long (got {n})"
        )
    return chunk_hash


def check_cache_salt(cache_salt: object) -> str:
    """Validate a cache salt on its own (the admin API checks path salts with this)."""
    if type(cache_salt) is not str:
        if not isinstance(cache_salt, str):
            raise InvalidKeyError("cache_salt", f"must be a str, not {type(cache_salt).__name__}")
        cache_salt = str(cache_salt)
    if not cache_salt:
        return ""
    if len(cache_salt) > CACHE_SALT_MAX_CHARS:
        raise InvalidKeyError(
            "cache_salt",
            f"must be at most {CACHE_SALT_MAX_CHARS} characters (got {len(cache_salt)})",
        )
    if not cache_salt.isascii() or _ASCII_BAD_SALT.search(cache_salt):
        problem = _bad_char(cache_salt, "@/\\")
        if problem:
            raise InvalidKeyError("cache_salt", problem)
    if cache_salt == DEFAULT_SALT_ALIAS:
        raise InvalidKeyError(
            "cache_salt", "'_default' is reserved (it names the empty salt in the admin API)"
        )
    return cache_salt


class ObjectKey(tuple[str, int, bytes, str]):
    """The key of one stored KV chunk: model, KV rank, chunk hash and optional tenant salt.

    Immutable and hashable; equality and hash cover all four fields, so two salts never
    collide. Validated once, at construction: a bad field raises
    :class:`~flexkv_store.errors.InvalidKeyError` naming the field and the rule.
    """

    # A tuple underneath, for speed: hashing and equality (every dict lookup of a key) run
    # in C rather than through Python-level __hash__/__eq__, which made them 3-4 times
    # slower, and C descriptors read the fields. As with a namedtuple, a key therefore also
    # equals (and hashes like) the plain tuple of its four fields, and keys order like
    # tuples; the rest of the tuple protocol is not part of the API.
    __slots__ = ()

    if TYPE_CHECKING:
        model_name: str
        kv_rank: int
        chunk_hash: bytes
        cache_salt: str
    else:
        model_name = _field(0, "The model name (1..512 UTF-8 bytes).")
        kv_rank = _field(1, "The KV rank (0..0xFFFFFFFF).")
        chunk_hash = _field(2, "The chunk hash (1..64 bytes).")
        cache_salt = _field(3, 'The tenant salt; "" for none.')

    def __new__(
        cls, model_name: str, kv_rank: int, chunk_hash: bytes, cache_salt: str = ""
    ) -> ObjectKey:
        return _new_tuple(
            cls,
            (
                _check_model_name(model_name),
                _check_kv_rank(kv_rank),
                _check_chunk_hash(chunk_hash),
                check_cache_salt(cache_salt),
            ),
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ObjectKey is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("ObjectKey is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        model_name, kv_rank, chunk_hash, cache_salt = self
        return (ObjectKey, (model_name, kv_rank, chunk_hash, cache_salt))

    def __repr__(self) -> str:
        return (
            f"ObjectKey(model_name={self.model_name!r}, kv_rank={self.kv_rank}, "
            f"chunk_hash=bytes.fromhex({self.chunk_hash.hex()!r}), "
            f"cache_salt={self.cache_salt!r})"
        )

    def replace(self, **changes: Any) -> ObjectKey:
        """A copy with some fields changed (validated like a new key)."""
        fields: dict[str, Any] = {
            "model_name": self.model_name,
            "kv_rank": self.kv_rank,
            "chunk_hash": self.chunk_hash,
            "cache_salt": self.cache_salt,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"unknown ObjectKey fields: {sorted(unknown)}")
        fields.update(changes)
        return ObjectKey(**fields)

    # -- wire string -------------------------------------------------------------------

    def to_wire(self) -> str:
        """``{model}@{rank:08x}@{hash hex}[@{salt}]``, byte-identical to LMCache 0.4.4-0.4.6."""
        # Unpacking reads the four fields faster than four attribute lookups.
        model_name, kv_rank, chunk_hash, cache_salt = self
        s = f"{model_name}@{kv_rank:08x}@{chunk_hash.hex()}"
        return f"{s}@{cache_salt}" if cache_salt else s

    @classmethod
    def from_wire(cls, s: str) -> ObjectKey:
        """Parse a canonical wire string; anything else raises :class:`KeyFormatError`."""
        if not isinstance(s, str):
            raise KeyFormatError("wire", f"must be a str, not {type(s).__name__}")
        parts = s.split("@")
        if len(parts) == 3:
            model, rank, hexhash = parts
            salt = ""
        elif len(parts) == 4:
            model, rank, hexhash, salt = parts
            if not salt:
                raise KeyFormatError("wire", "a 4th (cache_salt) field must not be empty")
        else:
            raise KeyFormatError(
                "wire", f"must have 3 or 4 '@'-separated fields (got {len(parts)})"
            )
        if not _RANK_WIRE.fullmatch(rank):
            raise KeyFormatError("wire", "kv_rank field must be exactly 8 lowercase hex digits")
        if not _HASH_HEX.fullmatch(hexhash):
            raise KeyFormatError(
                "wire", "chunk_hash field must be 2..128 lowercase hex digits, an even count"
            )
        try:
            return cls(model, int(rank, 16), bytes.fromhex(hexhash), salt)
        except KeyFormatError:
            raise
        except InvalidKeyError as exc:
            raise KeyFormatError(exc.field, exc.rule) from None

    # -- filename ----------------------------------------------------------------------

    def to_filename(self) -> str:
        """The LMCache-compatible filename, or ``h-{sha256(wire)}.data`` when that is overlong.

        The hashed form is used when the plain name would exceed 255 bytes (NAME_MAX);
        adapters then keep the full key in the object header.
        """
        model_name, kv_rank, chunk_hash, cache_salt = self
        name = f"{model_name.replace('/', _SEP)}@0x{kv_rank:08x}@{chunk_hash.hex()}"
        if cache_salt:
            name = f"{name}@{cache_salt}"
        name += ".data"
        if len(name) > NAME_MAX // 4 and len(name.encode("utf-8")) > NAME_MAX:
            return overlong_filename(self.to_wire())
        return name

    @property
    def filename_is_overlong(self) -> bool:
        """True when :meth:`to_filename` gives the hashed (non-invertible) form."""
        # Plain names always hold "@"; the hashed form never does (a model name may well
        # start with "h-").
        return "@" not in self.to_filename()

    @classmethod
    def from_filename(cls, name: str) -> ObjectKey:
        """Parse a canonical filename; hashed (overlong) names and anything else raise."""
        if not isinstance(name, str):
            raise KeyFormatError("filename", f"must be a str, not {type(name).__name__}")
        if not name.endswith(".data"):
            raise KeyFormatError("filename", "must end with '.data'")
        parts = name[:-5].split("@")
        if len(parts) == 3:
            model, rank, hexhash = parts
            salt = ""
        elif len(parts) == 4:
            model, rank, hexhash, salt = parts
            if not salt:
                raise KeyFormatError("filename", "a 4th (cache_salt) field must not be empty")
        else:
            raise KeyFormatError(
                "filename",
                f"must have 3 or 4 '@'-separated fields before '.data' (got {len(parts)})"
                + ("; hashed overlong names need the object header" if len(parts) == 1 else ""),
            )
        if "/" in model:
            raise KeyFormatError("filename", "must not contain '/'")
        if not _RANK_FILE.fullmatch(rank):
            raise KeyFormatError(
                "filename", "kv_rank field must be '0x' and exactly 8 lowercase hex digits"
            )
        if not _HASH_HEX.fullmatch(hexhash):
            raise KeyFormatError(
                "filename", "chunk_hash field must be 2..128 lowercase hex digits, an even count"
            )
        try:
            key = cls(model.replace(_SEP, "/"), int(rank[2:], 16), bytes.fromhex(hexhash), salt)
        except KeyFormatError:
            raise
        except InvalidKeyError as exc:
            raise KeyFormatError(exc.field, exc.rule) from None
        if key.to_filename() != name:
            raise KeyFormatError("filename", "is not the canonical filename of its key")
        return key


def overlong_filename(wire: str) -> str:
    """The fixed-length filename used when a key's plain filename exceeds NAME_MAX."""
    return f"h-{hashlib.sha256(wire.encode('utf-8')).hexdigest()}.data"


# -- LMCache 0.4.7-0.5.x names: an object_group_id field after kv_rank ----------------------
#
# Wire:     {model}@{kv_rank:08x}@{ogid:x}@{chunk_hash hex}[@{cache_salt}]
# Filename: {model, "/" -> "-SEP-"}@0x{kv_rank:08x}@{ogid:x}@{chunk_hash hex}[@{cache_salt}].data
#
# The same strict, canonical rules as the 0.4 forms (to_x(from_x(s)) == s), plus the group
# id: lowercase hex without leading zeros, at most 64 bits. An unsalted 0.5 name has as many
# fields as a salted 0.4 one, so a name is read as the generation its directory declares.


def _check_group(object_group_id: object) -> int:
    if type(object_group_id) is not int:
        if isinstance(object_group_id, bool) or not isinstance(object_group_id, int):
            raise InvalidKeyError(
                "object_group_id", f"must be an int, not {type(object_group_id).__name__}"
            )
        object_group_id = int(object_group_id)
    if not 0 <= object_group_id <= GROUP_ID_MAX:
        raise InvalidKeyError("object_group_id", f"must be in 0..2**64-1 (got {object_group_id})")
    return object_group_id


def to_wire_v05(key: ObjectKey, object_group_id: int = 0) -> str:
    """LMCache 0.5's wire string of ``key`` in group ``object_group_id``."""
    model_name, kv_rank, chunk_hash, cache_salt = key
    s = f"{model_name}@{kv_rank:08x}@{_check_group(object_group_id):x}@{chunk_hash.hex()}"
    return f"{s}@{cache_salt}" if cache_salt else s


def to_filename_v05(key: ObjectKey, object_group_id: int = 0) -> str:
    """LMCache 0.5's filename of ``key`` in group ``object_group_id``.

    LMCache 0.5 has no hashed form: a name over 255 bytes (NAME_MAX) is returned as it is,
    and no filesystem can hold it (the fs adapter refuses such keys in raw 0.5 mode).
    """
    model_name, kv_rank, chunk_hash, cache_salt = key
    name = (
        f"{model_name.replace('/', _SEP)}@0x{kv_rank:08x}"
        f"@{_check_group(object_group_id):x}@{chunk_hash.hex()}"
    )
    return f"{name}@{cache_salt}.data" if cache_salt else f"{name}.data"


def _parse_v05(
    what: str, text: str, rank_re: re.Pattern[str], rank_skip: int
) -> tuple[str, int, int, bytes, str]:
    parts = text.split("@")
    if len(parts) == 4:
        model, rank, group, hexhash = parts
        salt = ""
    elif len(parts) == 5:
        model, rank, group, hexhash, salt = parts
        if not salt:
            raise KeyFormatError(what, "a 5th (cache_salt) field must not be empty")
    else:
        raise KeyFormatError(
            what, f"must have 4 or 5 '@'-separated fields in LMCache 0.5 form (got {len(parts)})"
        )
    if not rank_re.fullmatch(rank):
        raise KeyFormatError(
            what,
            "kv_rank field must be "
            + ("'0x' and " if rank_skip else "")
            + "exactly 8 lowercase hex digits",
        )
    if not _GROUP_HEX.fullmatch(group):
        raise KeyFormatError(
            what, "object_group_id field must be lowercase hex without leading zeros (64 bits)"
        )
    if not _HASH_HEX.fullmatch(hexhash):
        raise KeyFormatError(
            what, "chunk_hash field must be 2..128 lowercase hex digits, an even count"
        )
    return model, int(rank[rank_skip:], 16), int(group, 16), bytes.fromhex(hexhash), salt


def from_wire_v05(s: str) -> tuple[ObjectKey, int]:
    """Parse LMCache 0.5's wire string: ``(key, object_group_id)``; else KeyFormatError."""
    if not isinstance(s, str):
        raise KeyFormatError("wire", f"must be a str, not {type(s).__name__}")
    model, rank, group, chunk_hash, salt = _parse_v05("wire", s, _RANK_WIRE, 0)
    try:
        return ObjectKey(model, rank, chunk_hash, salt), group
    except KeyFormatError:
        raise
    except InvalidKeyError as exc:
        raise KeyFormatError(exc.field, exc.rule) from None


def from_filename_v05(name: str) -> tuple[ObjectKey, int]:
    """Parse LMCache 0.5's filename: ``(key, object_group_id)``; else KeyFormatError."""
    if not isinstance(name, str):
        raise KeyFormatError("filename", f"must be a str, not {type(name).__name__}")
    if not name.endswith(".data"):
        raise KeyFormatError("filename", "must end with '.data'")
    model, rank, group, chunk_hash, salt = _parse_v05("filename", name[:-5], _RANK_FILE, 2)
    if "/" in model:
        raise KeyFormatError("filename", "must not contain '/'")
    try:
        key = ObjectKey(model.replace(_SEP, "/"), rank, chunk_hash, salt)
    except KeyFormatError:
        raise
    except InvalidKeyError as exc:
        raise KeyFormatError(exc.field, exc.rule) from None
    if to_filename_v05(key, group) != name:
        raise KeyFormatError("filename", "is not the canonical filename of its key")
    return key, group
