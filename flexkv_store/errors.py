"""The exceptions flexkv-store raises.

Every error the library raises on purpose derives from :class:`FlexKVStoreError`, so an
engine can catch one type. Backends convert their own exceptions (redis-py, botocore,
``OSError``) into this tree at one seam per adapter, always ``raise ... from exc``::

    FlexKVStoreError
    ├── InvalidKeyError (ValueError)       a key field breaks a rule (names the field and the rule)
    │   └── KeyFormatError                 a wire string or filename is not a canonical key
    ├── StorageError                       a backend failed to store or read an object
    │   ├── BackendUnavailableError        connection lost / timed out after retries, or the
    │   │                                  adapter's optional dependency is not installed
    │   ├── CorruptObjectError             a framed object failed its header or checksum check
    │   ├── BufferTooSmallError            ``get_into`` target smaller than the object
    │   └── ConcurrentWriteError           another process is writing the key (shared accounting)
    ├── QuotaExceededError                 one object is larger than its salt's quota
    ├── StoreClosedError (RuntimeError)    the store was closed (before or during the call)
    └── ConfigError (ValueError)           a config value is missing, unknown or out of range

Misses are not errors: ``get`` returns ``None`` and ``exists``/``delete`` return ``False``.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "BufferTooSmallError",
    "ConcurrentWriteError",
    "ConfigError",
    "CorruptObjectError",
    "FlexKVStoreError",
    "InvalidKeyError",
    "KeyFormatError",
    "QuotaExceededError",
    "StorageError",
    "StoreClosedError",
]


class FlexKVStoreError(Exception):
    """Base class of every error raised by flexkv-store."""


class InvalidKeyError(FlexKVStoreError, ValueError):
    """A key field breaks one of the key rules.

    ``field`` names the offending field (``model_name``, ``kv_rank``, ``chunk_hash``,
    ``cache_salt``, or ``wire``/``filename`` for whole strings) so callers and the admin
    API can report it without parsing the message.
    """

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class KeyFormatError(InvalidKeyError):
    """A wire string or filename is not the canonical form of any valid key."""


class StorageError(FlexKVStoreError):
    """A backend could not store, read or delete an object."""


class BackendUnavailableError(StorageError):
    """The backend cannot be reached (after retries), or its client library is missing."""


class ConcurrentWriteError(StorageError):
    """Another process admitted the same key and is still writing it (a shared accounting).

    Nothing was written here; that process's write settles the key (for KV chunks, the
    same bytes).
    """


class CorruptObjectError(StorageError):
    """A stored object failed its framing checks (magic, version, length or checksum)."""


class BufferTooSmallError(StorageError):
    """The buffer given to ``get_into`` is smaller than the stored object.

    ``needed`` is the object's payload size in bytes; ``available`` the buffer's size.
    """

    def __init__(self, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(
            f"buffer too small: the object has {needed} bytes, the buffer holds {available}"
        )


class QuotaExceededError(FlexKVStoreError):
    """A put was refused because the object alone exceeds its salt's quota.

    Nothing was written and nothing was evicted, with one exception: when a batch over
    several salts in a Redis accounting is refused by a later salt, other processes may
    have used the room the earlier salts' part left before it was undone; the objects
    that then no longer fit are evicted (the quota holds).
    """

    def __init__(
        self, cache_salt: str, size: int, limit: int, *, detail: str | None = None
    ) -> None:
        self.cache_salt = cache_salt
        self.size = size
        self.limit = limit
        shown = cache_salt or "_default"
        super().__init__(
            f"cache_salt {shown!r}: "
            + (detail or f"object of {size} bytes exceeds the quota of {limit} bytes")
        )


class ConfigError(FlexKVStoreError, ValueError):
    """A configuration value is missing, unknown, malformed or out of range."""


class StoreClosedError(FlexKVStoreError, RuntimeError):
    """The store is closed: a call after ``close()``, or one still in flight when it ran.

    A call failed this way has released every buffer it was given; what it wrote before
    the close is accounted like any other write.
    """
