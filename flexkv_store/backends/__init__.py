"""L2 backends: the adapter contract, the registry and the typed configs.

Adapters (``memory``, ``fs``, ``redis``, ``s3``, ``gds``) are imported lazily by
:func:`open_adapter`; their modules are private. See DESIGN section 3 and
``docs/writing-an-adapter.md``.
"""

from __future__ import annotations

from flexkv_store.backends._registry import (
    ENTRY_POINT_GROUP,
    AdapterSpec,
    adapter_class,
    available_adapters,
    open_adapter,
    parse_adapter_config,
    parse_backend_url,
    register_adapter,
)
from flexkv_store.backends.base import Buffer, Capabilities, CheckReport, L2Adapter, ObjectInfo
from flexkv_store.backends.config import (
    AdapterConfig,
    FsConfig,
    GdsConfig,
    MemoryConfig,
    RedisConfig,
    S3Config,
)

__all__ = [
    "AdapterConfig",
    "AdapterSpec",
    "Buffer",
    "Capabilities",
    "CheckReport",
    "ENTRY_POINT_GROUP",
    "FsConfig",
    "GdsConfig",
    "L2Adapter",
    "MemoryConfig",
    "ObjectInfo",
    "RedisConfig",
    "S3Config",
    "adapter_class",
    "available_adapters",
    "open_adapter",
    "parse_adapter_config",
    "parse_backend_url",
    "register_adapter",
]
