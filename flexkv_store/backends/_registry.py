"""Adapters by name: a lazy registry with install hints, plus third-party entry points.

An adapter's module (and its optional dependency: redis-py, boto3, kvikio) is imported only
when the adapter is opened; a missing dependency raises
:class:`~flexkv_store.errors.BackendUnavailableError` naming the pip extra. Third-party
adapters register through the entry-point group ``flexkv_store.backends`` (the entry point
loads the adapter class, which names its config model in ``config_class``) or by calling
:func:`register_adapter`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from flexkv_store.backends.config import (
    AdapterConfig,
    FsConfig,
    GdsConfig,
    MemoryConfig,
    RedisConfig,
    S3Config,
    validate_config,
)
from flexkv_store.errors import BackendUnavailableError, ConfigError

if TYPE_CHECKING:
    from flexkv_store.backends.base import L2Adapter

__all__ = [
    "AdapterSpec",
    "ENTRY_POINT_GROUP",
    "available_adapters",
    "config_class_for_scheme",
    "open_adapter",
    "parse_adapter_config",
    "register_adapter",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "flexkv_store.backends"


@dataclass(frozen=True)
class AdapterSpec:
    """Where an adapter lives and how to get its dependencies."""

    name: str
    #: ``"package.module:ClassName"``, imported on first use.
    target: str
    config_class: type[AdapterConfig]
    #: pip extra that installs the adapter's dependencies, for the error message.
    extra: str | None = None


_lock = threading.Lock()
_registry: dict[str, AdapterSpec] = {}
_entry_points_loaded = False


def register_adapter(
    name: str,
    target: str,
    config_class: type[AdapterConfig],
    *,
    extra: str | None = None,
    clobber: bool = False,
) -> None:
    """Register an adapter under ``name``; refuses to replace one unless ``clobber``."""
    with _lock:
        if name in _registry and not clobber and _registry[name].target != target:
            raise ValueError(
                f"adapter {name!r} is already registered ({_registry[name].target}); "
                "pass clobber=True to replace it"
            )
        _registry[name] = AdapterSpec(name, target, config_class, extra)


for _builtin in (
    AdapterSpec("memory", "flexkv_store.backends._memory:MemoryAdapter", MemoryConfig),
    AdapterSpec("fs", "flexkv_store.backends._fs:FsAdapter", FsConfig),
    AdapterSpec("redis", "flexkv_store.backends._redis:RedisAdapter", RedisConfig, "redis"),
    AdapterSpec("s3", "flexkv_store.backends._s3:S3Adapter", S3Config, "s3"),
    AdapterSpec("gds", "flexkv_store.backends._gds:GdsAdapter", GdsConfig),
):
    _registry[_builtin.name] = _builtin


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _registry:
            continue
        try:
            cls = ep.load()
            config_class = cls.config_class
        except Exception as exc:  # a broken plug-in must not break the built-in adapters
            log.warning("could not load flexkv_store backend %r (%s): %s", ep.name, ep.value, exc)
            continue
        register_adapter(ep.name, ep.value, config_class)


def _spec(name: str) -> AdapterSpec:
    if name not in _registry:
        _load_entry_points()
    try:
        return _registry[name]
    except KeyError:
        raise ConfigError(
            f"unknown backend type {name!r}; known: {', '.join(available_adapters())}"
        ) from None


def available_adapters() -> list[str]:
    """Names of every registered adapter (built-in and plug-ins)."""
    _load_entry_points()
    return sorted(_registry)


def config_class_for_scheme(scheme: str) -> type[AdapterConfig]:
    """The config model whose URL schemes include ``scheme``."""
    _load_entry_points()
    for spec in _registry.values():
        if scheme in spec.config_class.schemes:
            return spec.config_class
    known = sorted(s for spec in _registry.values() for s in spec.config_class.schemes)
    raise ConfigError(f"unknown backend URL scheme {scheme!r}; known: {', '.join(known)}")


def parse_backend_url(url: str) -> AdapterConfig:
    """The typed config for a backend URL, dispatched on its scheme (here, beside the
    registry that knows the schemes: the config models import nothing of it)."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"backend URL {url!r}: expected scheme://..., e.g. fs:///var/cache/kv")
    scheme = url.split("://", 1)[0].lower()
    return config_class_for_scheme(scheme).from_url(url)


def parse_adapter_config(config: str | Mapping[str, Any] | AdapterConfig) -> AdapterConfig:
    """A typed adapter config from a URL, a mapping with a ``type`` key, or a config."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        return parse_backend_url(config)
    if isinstance(config, Mapping):
        data = dict(config)
        if "url" in data and "type" not in data and len(data) == 1:
            return parse_backend_url(str(data["url"]))
        kind = data.get("type")
        if not isinstance(kind, str):
            raise ConfigError(
                "backend: needs a 'type' key (one of "
                f"{', '.join(available_adapters())}) or a URL string"
            )
        spec = _spec(kind)
        return validate_config(spec.config_class, data, where=f"backend ({kind})")
    raise ConfigError(
        f"backend: expected a URL, a mapping or a config, not {type(config).__name__}"
    )


def adapter_class(name: str) -> type[L2Adapter]:
    """Import and return the adapter class registered as ``name``."""
    spec = _spec(name)
    module_name, _, attr = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: pip install 'flexkv-store[{spec.extra}]'" if spec.extra else ""
        raise BackendUnavailableError(
            f"the {name!r} adapter needs a package that is not installed ({exc.name}){hint}"
        ) from exc
    cls: type[L2Adapter] = getattr(module, attr)
    return cls


def open_adapter(config: str | Mapping[str, Any] | AdapterConfig) -> L2Adapter:
    """Open the adapter a URL or config names, e.g. ``open_adapter("fs:///var/cache/kv")``.

    Use it as an async context manager or call ``await adapter.aclose()`` when done.
    """
    cfg = parse_adapter_config(config)
    cls = adapter_class(cfg.type)
    return cls(cfg)  # type: ignore[call-arg]
