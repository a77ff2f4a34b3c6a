"""flexkv-store: the KV cache of LLM inference engines, kept outside GPU memory.

One validated key type (:class:`ObjectKey`), one async adapter contract
(:class:`L2Adapter`) with interchangeable backends (filesystem with io_uring, Redis, S3,
GPU Direct Storage, memory), per-tenant quotas with a UserLRU policy, and a
:class:`Store` that engines call.

Importing this package imports neither torch nor redis nor boto3: each is loaded only by
the part that needs it.
"""

from __future__ import annotations

from flexkv_store.backends import (
    AdapterConfig,
    Capabilities,
    L2Adapter,
    ObjectInfo,
    available_adapters,
    open_adapter,
    register_adapter,
)
from flexkv_store.config import StoreConfig, load_config
from flexkv_store.errors import (
    BackendUnavailableError,
    BufferTooSmallError,
    ConcurrentWriteError,
    ConfigError,
    CorruptObjectError,
    FlexKVStoreError,
    InvalidKeyError,
    KeyFormatError,
    QuotaExceededError,
    StorageError,
    StoreClosedError,
)
from flexkv_store.keyformat import (
    ObjectKey,
    build_namespace,
    chunk_keys,
    flexkv_block_hashes,
    vllm_block_hashes,
)
from flexkv_store.store import BlockingStore, Store, open_store

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "BackendUnavailableError",
    "BlockingStore",
    "BufferTooSmallError",
    "Capabilities",
    "ConcurrentWriteError",
    "ConfigError",
    "CorruptObjectError",
    "FlexKVStoreError",
    "InvalidKeyError",
    "KeyFormatError",
    "L2Adapter",
    "ObjectInfo",
    "ObjectKey",
    "QuotaExceededError",
    "StorageError",
    "Store",
    "StoreClosedError",
    "StoreConfig",
    "__version__",
    "available_adapters",
    "build_namespace",
    "chunk_keys",
    "flexkv_block_hashes",
    "load_config",
    "open_adapter",
    "open_store",
    "register_adapter",
    "vllm_block_hashes",
]
