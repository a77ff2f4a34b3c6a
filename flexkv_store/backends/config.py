"""Typed config per adapter, and backend URLs.

One pydantic model per adapter; unknown keys are rejected with the valid ones listed, and
secrets (passwords, S3 keys) are :class:`pydantic.SecretStr`, so they never show in a
repr, a log line, a ``model_dump`` or an API response. Every key can also be given as a
URL query parameter::

    fs:///var/cache/flexkv?direct_io=true        fs:///mnt/nvme0;/mnt/nvme1
    redis://host:6379/0   rediss://...   redis+unix:///run/redis.sock?db=1
    redis+cluster://h1:7000,h2:7001
    s3://bucket/prefix?endpoint_url=http://127.0.0.1:9000&addressing_style=path
    gds:///mnt/nvme0       memory://
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from flexkv_store.errors import ConfigError

_M = TypeVar("_M", bound=BaseModel)

__all__ = [
    "AdapterConfig",
    "FsConfig",
    "GdsConfig",
    "MemoryConfig",
    "RedisConfig",
    "S3Config",
    "config_error",
    "validate_config",
]


class AdapterConfig(BaseModel):
    """Base of every adapter config: strict keys, secrets redacted, one ``type`` tag."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    #: The registry name of the adapter this config is for.
    type: str
    #: URL schemes that select this adapter.
    schemes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_url(cls, url: str) -> AdapterConfig:
        """Build a config from a backend URL (the scheme was already matched)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a URL")

    def redacted(self) -> dict[str, Any]:
        """A JSON-safe dump with every secret shown as ``'**********'``."""
        out = self.model_dump(mode="json")
        for name, value in self:
            if isinstance(value, SecretStr):
                out[name] = "**********"
        return out


def _with_params(data: dict[str, Any], params: dict[str, str], url: str) -> dict[str, Any]:
    """URL parts plus query parameters; a parameter may not repeat a part of the URL."""
    clash = sorted(set(data) & set(params) - {"type"})
    if clash or "type" in params:
        raise ConfigError(
            f"backend URL {url!r}: {', '.join(clash or ['type'])} is given by the URL itself; "
            "do not repeat it as a query parameter"
        )
    return {**data, **params}


def _query(url: str) -> tuple[Any, dict[str, str]]:
    parts = urlsplit(url)
    params: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in params:
            raise ConfigError(f"backend URL: query parameter {k!r} given twice")
        params[k] = v
    return parts, params


class MemoryConfig(AdapterConfig):
    """``memory://``: a dict in this process (the reference adapter and the L1 tier)."""

    type: Literal["memory"] = "memory"
    #: Bytes of payload the adapter holds at most; a put beyond it raises StorageError.
    capacity_bytes: int | None = Field(default=None, ge=0)
    #: Bytes of freed large payloads kept for reuse by later puts (fresh pages cost more
    #: than the copy); at most ``capacity_bytes``; 0 returns freed memory at once.
    recycle_bytes: int = Field(default=1 << 30, ge=0)
    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    @classmethod
    def from_url(cls, url: str) -> MemoryConfig:
        _, params = _query(url)
        return validate_config(
            cls, _with_params({"type": "memory"}, params, url), where="backend URL"
        )


class FsConfig(AdapterConfig):
    """``fs:///dir`` or ``fs:///a;/b``: one file per object, optionally striped over dirs."""

    type: Literal["fs"] = "fs"  # type: ignore[assignment]
    #: One directory, or several separated by ``;`` (objects striped over them by hash).
    path: str
    #: ``auto`` picks io_uring where liburing and a compiler are present, else threads.
    io_engine: Literal["auto", "io_uring", "threads"] = "auto"
    #: O_DIRECT reads and writes with 4096-aligned buffers (bypasses the page cache).
    direct_io: bool = False
    #: io_uring submission queue depth.
    queue_depth: int = Field(default=32, ge=1, le=4096)
    #: ``sharded`` (two levels of hash subdirectories) or ``flat`` (LMCache-compatible).
    layout: Literal["sharded", "flat"] = "sharded"
    #: ``framed`` (header with key and checksum) or ``raw`` (payload only, LMCache files).
    format: Literal["framed", "raw"] = "framed"
    #: With ``format: raw``, which LMCache generation's names the directory holds: ``"0.4"``
    #: (LMCache 0.4.4-0.4.6, the 3/4-field names) or ``"0.5"`` (0.4.7-0.5.x, with an
    #: ``object_group_id`` field; group 0 is read and written, other groups skipped).
    lmcache: Literal["0.4", "0.5"] = "0.4"
    #: ``never``, ``data`` (fdatasync before publishing) or ``always`` (also the directory).
    fsync: Literal["never", "data", "always"] = "never"
    #: Threads of the thread-pool engine (and of the io_uring engine's fallback work).
    threads: int = Field(default=8, ge=1, le=256)
    schemes: ClassVar[tuple[str, ...]] = ("fs", "file")

    @field_validator("path")
    @classmethod
    def _paths(cls, v: str) -> str:
        dirs = v.split(";")
        if not v or any(not p.strip() for p in dirs):
            raise ValueError("must name at least one directory; separate several with ';'")
        return v

    @field_validator("lmcache", mode="before")
    @classmethod
    def _generation(cls, v: Any) -> Any:
        # YAML reads an unquoted 0.5 as a float; accept it as the version it spells.
        if isinstance(v, float) and v in (0.4, 0.5):
            return str(v)
        return v

    @model_validator(mode="after")
    def _lmcache_needs_raw(self) -> FsConfig:
        if self.lmcache != "0.4" and self.format != "raw":
            raise ValueError(
                "lmcache: '0.5' names LMCache files in a format: raw directory; framed "
                "objects always use the 0.4 names (set format: raw, or drop lmcache)"
            )
        return self

    @property
    def paths(self) -> list[str]:
        """The directories, in order."""
        return self.path.split(";")

    @classmethod
    def from_url(cls, url: str) -> FsConfig:
        parts, params = _query(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"backend URL {url!r}: fs URLs take a local path (fs:///dir), not host "
                f"{parts.netloc!r}"
            )
        scheme_type = cls.model_fields["type"].default
        return validate_config(
            cls,
            _with_params({"type": scheme_type, "path": unquote(parts.path)}, params, url),
            where="backend URL",
        )


class GdsConfig(FsConfig):
    """``gds:///dir``: the fs layout, with cuFile (kvikio) I/O to CUDA memory when present."""

    type: Literal["gds"] = "gds"  # type: ignore[assignment]
    #: ``auto`` uses cuFile when kvikio, a GPU and its driver are present.
    use_cufile: Literal["auto", "true", "false"] | bool = "auto"
    schemes: ClassVar[tuple[str, ...]] = ("gds",)


class RedisConfig(AdapterConfig):
    """``redis://``, ``rediss://`` (TLS), ``redis+unix://`` and ``redis+cluster://``."""

    type: Literal["redis"] = "redis"  # type: ignore[assignment]
    #: A redis-py URL; when set, host/port/db/unix_socket come from it.
    url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    unix_socket: str | None = None
    #: Redis Cluster mode; ``nodes`` lists ``host:port`` seeds.
    cluster: bool = False
    nodes: list[str] = Field(default_factory=list)
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    tls_ca_certs: str | None = None
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_verify: bool = True
    #: Prefix put in front of every wire key (namespaces one Redis between deployments).
    key_prefix: str = ""
    max_connections: int = Field(default=32, ge=1)
    #: Seconds before a socket operation is abandoned (then BackendUnavailableError).
    socket_timeout: float = Field(default=5.0, gt=0)
    #: Values above this size are not pipelined deeply in batches (bytes).
    pipeline_value_limit: int = Field(default=1 << 20, ge=0)
    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+unix", "redis+cluster")

    @field_validator("socket_timeout")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number of seconds")
        return v

    @classmethod
    def from_url(cls, url: str) -> RedisConfig:
        parts, params = _query(url)
        scheme = parts.scheme
        data: dict[str, Any] = {"type": "redis"}
        if parts.username:
            data["username"] = unquote(parts.username)
        if parts.password:
            data["password"] = unquote(parts.password)
        if scheme == "redis+unix":
            data["unix_socket"] = unquote(parts.path)
        elif scheme == "redis+cluster":
            hosts = parts.netloc.rsplit("@", 1)[-1]
            data["cluster"] = True
            data["nodes"] = [h for h in hosts.split(",") if h]
            if not data["nodes"]:
                raise ConfigError(f"backend URL {url!r}: redis+cluster needs host:port nodes")
        else:
            if scheme == "rediss":
                data["tls"] = True
            if parts.hostname:
                data["host"] = parts.hostname
            try:
                port = parts.port
            except ValueError as exc:
                raise ConfigError(f"backend URL {url!r}: {exc}") from None
            if port:
                data["port"] = port
            db = parts.path.strip("/")
            if db:
                if not db.isdigit():
                    raise ConfigError(f"backend URL {url!r}: the path must be a db number")
                data["db"] = int(db)
        return validate_config(cls, _with_params(data, params, url), where="backend URL")


class S3Config(AdapterConfig):
    """``s3://bucket/prefix``: AWS S3, MinIO, Ceph RGW or any S3-compatible service."""

    type: Literal["s3"] = "s3"  # type: ignore[assignment]
    bucket: str = Field(min_length=3, max_length=63)
    #: Prepended to every object name (a trailing '/' is not added for you).
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    #: Path to a PEM bundle for a private CA (MinIO/Ceph with their own certificates).
    ca_bundle: str | None = None
    #: Explicit credentials; when absent boto3's usual chain (env, files, IMDS) is used.
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    #: Objects at least this large are uploaded in parts (bytes).
    multipart_threshold: int = Field(default=64 << 20, ge=5 << 20)
    #: Part size for multipart uploads and ranged GETs (bytes).
    part_size: int = Field(default=16 << 20, ge=5 << 20)
    #: Requests in flight at once for batches, parts and ranges.
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    #: Attempts per request (retries with backoff on throttling, 5xx, connection errors).
    max_attempts: int = Field(default=5, ge=1, le=50)
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)
    schemes: ClassVar[tuple[str, ...]] = ("s3",)

    @classmethod
    def from_url(cls, url: str) -> S3Config:
        parts, params = _query(url)
        if not parts.netloc:
            raise ConfigError(f"backend URL {url!r}: s3 URLs name a bucket: s3://bucket/prefix")
        data: dict[str, Any] = {"type": "s3", "bucket": parts.netloc}
        prefix = unquote(parts.path.lstrip("/"))
        if prefix:
            data["prefix"] = prefix
        return validate_config(cls, _with_params(data, params, url), where="backend URL")


def config_error(exc: ValidationError, where: str, model: type[BaseModel]) -> ConfigError:
    """Turn a pydantic error into a ConfigError that points at the field and the rule."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = ", ".join(sorted(_model_at(model, err["loc"][:-1]).model_fields))
            lines.append(f"{where}: unknown key {loc!r}; valid keys: {valid}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    return ConfigError("; ".join(lines))


def _model_at(model: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel]:
    """The (sub)model that ``path`` points into, for listing its valid keys."""
    for part in path:
        field = model.model_fields.get(str(part))
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return model
        model = sub
    return model


def validate_config(model: type[_M], data: Any, *, where: str) -> _M:
    """Validate ``data`` against ``model``, raising :class:`ConfigError` on any problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, where, model) from None
