"""Typed store config: from YAML/JSON files, dicts, backend URLs and the environment.

Sources, lowest priority first:

1. the defaults (an fs backend in ``./flexkv-cache``, no L1, no quotas, admin API on
   127.0.0.1:8000, metrics on);
2. the environment: ``FLEXKV_STORE_<SECTION>__<KEY>`` (e.g. ``FLEXKV_STORE_BACKEND__PATH``,
   ``FLEXKV_STORE_QUOTA__DEFAULT_QUOTA_BYTES``), ``FLEXKV_STORE_BACKEND`` for a whole
   backend URL, and ``FLEXKV_STORE_ADMIN_TOKEN`` for the admin token;
3. an explicit file (``--config FILE`` or ``FLEXKV_STORE_CONFIG``), dict or URL.

Sizes take ``*_bytes`` or ``*_gb`` (GiB, 1024**3); giving both is an error. Every error is
a :class:`~flexkv_store.errors.ConfigError` that names the field and the rule; secrets are
redacted in :meth:`StoreConfig.redacted`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from flexkv_store.backends._registry import parse_adapter_config
from flexkv_store.backends.config import AdapterConfig, FsConfig, config_error
from flexkv_store.errors import ConfigError
from flexkv_store.keyformat import check_cache_salt

__all__ = [
    "ENV_PREFIX",
    "AdminConfig",
    "L1Config",
    "MetricsConfig",
    "QuotaConfig",
    "StoreConfig",
    "load_config",
]

ENV_PREFIX = "FLEXKV_STORE_"
GIB = 1 << 30
DEFAULT_CACHE_DIR = "./flexkv-cache"


def _gb_to_bytes(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{field}: must be a number of GiB")
    try:
        gb = float(value)
    except ValueError:
        raise ValueError(f"{field}: must be a number of GiB (got {value!r})") from None
    if not math.isfinite(gb) or gb < 0:
        raise ValueError(f"{field}: must be a finite, non-negative number of GiB")
    return round(gb * GIB)


def _fold_gb(data: Any) -> Any:
    """Turn ``x_gb`` keys into ``x_bytes`` (and ``quotas_gb`` into ``quotas``)."""
    if not isinstance(data, Mapping):
        return data
    out = dict(data)
    for key in list(out):
        if not isinstance(key, str) or not key.endswith("_gb"):
            continue
        base = key[:-3]
        target = "quotas" if base == "quotas" else f"{base}_bytes"
        if target in out:
            raise ValueError(f"give either {key!r} or {target!r}, not both")
        value = out.pop(key)
        if base == "quotas":
            if not isinstance(value, Mapping):
                raise ValueError("quotas_gb: must map cache salts to GiB")
            out[target] = {s: _gb_to_bytes(v, f"quotas_gb.{s}") for s, v in value.items()}
        else:
            out[target] = None if value is None else _gb_to_bytes(value, key)
    return out


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _gb_forms(cls, data: Any) -> Any:
        return _fold_gb(data)


class L1Config(_Section):
    """The CPU-memory tier in front of the L2 backends."""

    #: Bytes of hot chunks kept in memory; 0 disables the tier.
    capacity_bytes: int = Field(default=0, ge=0)


class QuotaConfig(_Section):
    """Per-salt quotas (UserLRU) and the optional global capacity."""

    policy: Literal["user_lru"] = "user_lru"
    #: Bound on the whole store's payload bytes (global LRU eviction); None = unbounded.
    capacity_bytes: int | None = Field(default=None, ge=0)
    #: Quota of a salt without its own; None = unlimited, 0 = allowlist mode.
    default_quota_bytes: int | None = Field(default=None, ge=0)
    #: Quotas set at start (salt -> bytes); ``_default`` names the empty salt.
    quotas: dict[str, int] = Field(default_factory=dict)
    #: Where set quotas persist: a JSON file path. Default: next to the first fs backend's
    #: data, else ``./flexkv-quota.json``; a Redis hash when the first backend is Redis.
    #: (The local accounting only: a shared one keeps quotas itself.)
    state_path: str | None = None
    #: Where usage, LRU order and quotas live: ``local`` (this process), ``sqlite`` (one
    #: database shared by the processes of a node, next to the first fs backend's data),
    #: ``sqlite:///path/to/db``, ``redis`` (the first Redis backend's server and prefix) or
    #: a Redis URL (``redis://``, ``rediss://``, ``redis+cluster://``: many nodes).
    accounting: str = "local"
    #: A shared accounting applies hits' LRU updates in batches, this often (ms).
    touch_interval_ms: int = Field(default=100, ge=1, le=60_000)
    #: Settle a shared accounting against the backends' listing at start (as ``fsck``
    #: does); otherwise it is rebuilt from a scan only when it is empty.
    reconcile: bool = False

    @field_validator("accounting")
    @classmethod
    def _accounting(cls, v: str) -> str:
        if v in ("local", "sqlite", "redis") or (
            v.startswith("sqlite:///") and len(v) > len("sqlite:///")
        ):
            return v
        if v.split("://", 1)[0] in ("redis", "rediss", "redis+unix", "redis+cluster"):
            return v
        raise ValueError(
            "must be 'local', 'sqlite' or 'sqlite:///path' (one SQLite database for the "
            "processes of a node), 'redis' (the first Redis backend's server) or a Redis URL "
            f"(redis://, rediss://, redis+cluster://; for several nodes); got {v!r}"
        )

    @field_validator("quotas")
    @classmethod
    def _salts(cls, v: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for salt, limit in v.items():
            real = "" if salt == "_default" else salt
            check_cache_salt(real)
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"quota of {salt!r} must be a non-negative int of bytes")
            out[real] = limit
        return out


def is_loopback_host(host: str) -> bool:
    """Whether an admin API bound to ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminConfig(_Section):
    """The admin HTTP API served by ``flexkv-store serve``."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: Bearer token required on mutating routes (``FLEXKV_STORE_ADMIN_TOKEN``).
    token: SecretStr | None = None
    #: ``false``: clients on a loopback address change quotas without the token (what
    #: LMCache's ``lmcache quota`` needs: it sends none); every other client still needs it.
    local_requests_need_token: bool = True


class MetricsConfig(_Section):
    """Prometheus metrics."""

    enabled: bool = True


class StoreConfig(BaseModel):
    """The whole store: backends, L1 tier, quotas, admin API, metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: AdapterConfig | None = None
    backends: list[AdapterConfig] | None = None
    l1: L1Config = Field(default_factory=L1Config)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("backend", mode="before")
    @classmethod
    def _one_backend(cls, v: Any) -> Any:
        return None if v is None else parse_adapter_config(_url_table(v))

    @field_validator("backends", mode="before")
    @classmethod
    def _many_backends(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, (str, Mapping)) or not hasattr(v, "__iter__"):
            raise ValueError("must be a list of backend URLs or tables")
        items = [parse_adapter_config(b) for b in v]
        if not items:
            raise ValueError("must name at least one backend")
        return items

    @model_validator(mode="after")
    def _exactly_one(self) -> StoreConfig:
        if self.backend is not None and self.backends is not None:
            raise ValueError("give exactly one of 'backend' and 'backends', not both")
        return self

    @property
    def adapters(self) -> list[AdapterConfig]:
        """The L2 backends in order (the default fs backend when none is configured)."""
        if self.backends is not None:
            return list(self.backends)
        if self.backend is not None:
            return [self.backend]
        return [FsConfig(path=DEFAULT_CACHE_DIR)]

    def redacted(self) -> dict[str, Any]:
        """A JSON-safe dump with secrets shown as ``'**********'``."""
        out = self.model_dump(mode="json", exclude={"backend", "backends"})
        out["backends"] = [a.redacted() for a in self.adapters]
        if self.admin.token is not None:
            out["admin"]["token"] = "**********"
        return out


def _url_table(v: Any) -> Any:
    """A backend table without ``type``: a URL plus keys that amend it (from the
    environment: ``FLEXKV_STORE_BACKEND`` and ``FLEXKV_STORE_BACKEND__<KEY>``), or keys
    alone, which amend the default fs backend (``FLEXKV_STORE_BACKEND__PATH=/mnt/kv``)."""
    if not isinstance(v, Mapping) or "type" in v:
        return v
    rest = dict(v)
    url = rest.pop("url", None)
    if url is None:
        return {"type": "fs", "path": DEFAULT_CACHE_DIR, **rest}
    base = parse_adapter_config(str(url))
    return {**base.model_dump(), **rest}


def _env_value(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    if text.lower() in ("null", "none"):
        return None
    return raw


def config_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The config the ``FLEXKV_STORE_*`` variables describe (sections as nested dicts)."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if rest == "admin_token":
            out.setdefault("admin", {})["token"] = raw
            continue
        if rest in ("backend", "backends") and "__" not in rest:
            value = _env_value(raw)
            if rest == "backends" and isinstance(value, str):
                value = [u for u in value.split(",") if u]
            if rest == "backend" and isinstance(out.get(rest), dict):
                out[rest]["url"] = value  # keys seen before the URL amend it
            else:
                out[rest] = value
            continue
        if "__" not in rest:
            continue  # not ours (e.g. FLEXKV_STORE_ADMIN_TOKEN handled above)
        section, key = rest.split("__", 1)
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            target = out[section] = {"url": target}
        target[key] = _env_value(raw)
    return out


def _fold_sections(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _fold_gb(v) if k in _SECTIONS else v for k, v in doc.items()}


_SECTIONS = ("l1", "quota", "admin", "metrics")


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's contents: YAML (``.yaml``/``.yml``) or JSON."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r}: not valid YAML/JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: the top level must be a mapping")
    return data


def load_config(
    source: str | Path | Mapping[str, Any] | StoreConfig | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> StoreConfig:
    """Build a validated :class:`StoreConfig`.

    ``source`` is a config file path, a backend URL (``"fs:///var/cache/kv"``), a mapping,
    a ready config, or ``None`` (then ``FLEXKV_STORE_CONFIG`` names a file, if set). The
    environment fills in what the source leaves out.
    """
    if isinstance(source, StoreConfig):
        return source
    env = os.environ if environ is None else environ
    explicit: Mapping[str, Any]
    where = "config"
    if source is None:
        path = env.get(ENV_PREFIX + "CONFIG")
        explicit = read_config_file(path) if path else {}
        where = f"config file {path!r}" if path else "config"
    elif isinstance(source, Mapping):
        explicit = source
    elif isinstance(source, str) and "://" in source:
        explicit = {"backend": source}
    else:
        explicit = read_config_file(source)
        where = f"config file {str(source)!r}"
    from_env = config_from_env(env)
    # A backend given explicitly replaces the env's backend entirely (no mixed tables).
    if "backend" in explicit or "backends" in explicit:
        from_env.pop("backend", None)
        from_env.pop("backends", None)
    try:
        # GiB forms become bytes per source, so a file's *_gb overrides the env's *_bytes.
        merged = _merge(_fold_sections(from_env), _fold_sections(explicit))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        return StoreConfig.model_validate(merged)
    except ValidationError as exc:
        raise config_error(exc, where, StoreConfig) from None
    except ValueError as exc:  # ConfigError from a backend URL, or a bad GiB value
        raise ConfigError(f"{where}: {exc}") from None
