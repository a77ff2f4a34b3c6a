"""Typed config, backend URLs, secrets redaction, the environment, and the adapter registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flexkv_store.backends import (
    FsConfig,
    RedisConfig,
    S3Config,
    available_adapters,
    open_adapter,
    parse_adapter_config,
    parse_backend_url,
    register_adapter,
)
from flexkv_store.backends import _registry as registry
from flexkv_store.backends._memory import MemoryAdapter
from flexkv_store.config import config_from_env, load_config
from flexkv_store.errors import BackendUnavailableError, ConfigError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("fs:///var/cache/kv", {"type": "fs", "path": "/var/cache/kv"}),
        ("fs:///mnt/a;/mnt/b?direct_io=true&queue_depth=64",
         {"type": "fs", "path": "/mnt/a;/mnt/b", "direct_io": True, "queue_depth": 64}),
        ("gds:///mnt/nvme0?use_cufile=false", {"type": "gds", "path": "/mnt/nvme0"}),
        ("redis://h:6380/2", {"type": "redis", "host": "h", "port": 6380, "db": 2}),
        ("rediss://u:pw@h:6379/0", {"type": "redis", "tls": True, "username": "u"}),
        ("redis+unix:///run/redis.sock?db=3",
         {"type": "redis", "unix_socket": "/run/redis.sock", "db": 3}),
        ("redis+cluster://h1:7000,h2:7001?key_prefix=kv:",
         {"type": "redis", "cluster": True, "nodes": ["h1:7000", "h2:7001"], "key_prefix": "kv:"}),
        ("s3://bucket/some/prefix?endpoint_url=http://127.0.0.1:9000&addressing_style=path",
         {"type": "s3", "bucket": "bucket", "prefix": "some/prefix",
          "endpoint_url": "http://127.0.0.1:9000", "addressing_style": "path"}),
        ("memory://?capacity_bytes=100", {"type": "memory", "capacity_bytes": 100}),
    ],
)  # fmt: skip
def test_url_forms(url: str, expected: dict[str, Any]) -> None:
    cfg = parse_backend_url(url)
    dumped = cfg.model_dump()
    for k, v in expected.items():
        assert dumped[k] == v, k


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("fs:///x?bogus=1", "unknown key 'bogus'; valid keys: direct_io"),
        ("fs:///x?queue_depth=0", "queue_depth"),
        ("fs:///x?layout=round", "layout"),
        ("s3://ab", "bucket"),
        ("s3:///nobucket", "name a bucket"),
        ("redis://h:notaport/0", "port"),
        ("redis://h/xyz", "db number"),
        ("redis+cluster://", "host:port"),
        ("ftp://x", "unknown backend URL scheme 'ftp'"),
        ("not a url", "scheme://"),
        ("fs:///x?direct_io=1&direct_io=0", "twice"),
    ],
)
def test_bad_urls_name_the_problem(url: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_backend_url(url)
    assert needle in str(info.value)


def test_tables_reject_unknown_keys_listing_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_adapter_config({"type": "redis", "hots": "x"})
    msg = str(info.value)
    assert "unknown key 'hots'" in msg
    assert "host" in msg
    assert "key_prefix" in msg
    with pytest.raises(ConfigError, match="needs a 'type' key"):
        parse_adapter_config({"path": "/x"})
    with pytest.raises(ConfigError, match="unknown backend type 'nfs'"):
        parse_adapter_config({"type": "nfs"})


def test_secrets_are_redacted_everywhere() -> None:
    r = parse_backend_url("redis://user:hunter2@127.0.0.1:6379/0")
    s = S3Config.model_validate(
        {"bucket": "bkt", "access_key_id": "AKIA", "secret_access_key": "sekrit",
         "session_token": "tok3n"}
    )  # fmt: skip
    for text in (repr(r), str(r), json.dumps(r.redacted()), repr(s), json.dumps(s.redacted())):
        assert "hunter2" not in text
        assert "sekrit" not in text
        assert "tok3n" not in text
    assert isinstance(r, RedisConfig)
    assert r.password is not None
    assert r.password.get_secret_value() == "hunter2"
    store_cfg = load_config({"backend": "redis://:hunter2@h:1/0", "admin": {"token": "adm1n"}},
                            environ={})  # fmt: skip
    dumped = json.dumps(store_cfg.redacted())
    assert "hunter2" not in dumped
    assert "adm1n" not in dumped
    assert "adm1n" not in repr(store_cfg)


def test_environment_and_precedence(tmp_path: Path) -> None:
    env = {
        "FLEXKV_STORE_BACKEND__TYPE": "fs",
        "FLEXKV_STORE_BACKEND__PATH": "/from/env",
        "FLEXKV_STORE_QUOTA__DEFAULT_QUOTA_GB": "2",
        "FLEXKV_STORE_QUOTA__QUOTAS": '{"alice": 100, "_default": 5}',
        "FLEXKV_STORE_L1__CAPACITY_BYTES": "4096",
        "FLEXKV_STORE_ADMIN_TOKEN": "t",
        "FLEXKV_STORE_METRICS__ENABLED": "false",
        "UNRELATED": "x",
    }
    cfg = load_config(None, environ=env)
    assert cfg.adapters == [FsConfig(path="/from/env")]
    assert cfg.quota.default_quota_bytes == 2 << 30
    assert cfg.quota.quotas == {"alice": 100, "": 5}
    assert cfg.l1.capacity_bytes == 4096
    assert cfg.admin.token is not None
    assert cfg.metrics.enabled is False
    # an explicit file wins over the environment; the env fills in what it leaves out
    f = tmp_path / "c.yaml"
    f.write_text("backend: memory://\nl1:\n  capacity_gb: 0.5\n")
    cfg = load_config(f, environ=env)
    assert cfg.adapters[0].type == "memory"
    assert cfg.l1.capacity_bytes == 1 << 29
    assert cfg.quota.default_quota_bytes == 2 << 30
    # FLEXKV_STORE_CONFIG names the file
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"backends": ["memory://", "fs:///tmp/x"]}))
    cfg = load_config(None, environ={"FLEXKV_STORE_CONFIG": str(j)})
    assert [a.type for a in cfg.adapters] == ["memory", "fs"]
    assert config_from_env({"FLEXKV_STORE_BACKEND": "memory://"}) == {"backend": "memory://"}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"quota": {"default_quota_bytes": -1}}, "quota.default_quota_bytes"),
        ({"quota": {"quotas": {"a@b": 1}}}, "cache_salt"),
        (
            {"quota": {"bogus": 1}},
            "unknown key 'quota.bogus'; valid keys: accounting, capacity_bytes",
        ),
        ({"l1": {"capacity_gb": "lots"}}, "capacity_gb"),
        ({"quota": {"capacity_gb": 1, "capacity_bytes": 2}}, "not both"),
        ({"backend": "memory://", "backends": ["memory://"]}, "exactly one"),
        ({"backends": []}, "at least one"),
        ({"admin": {"port": 70000}}, "admin.port"),
        ({"nonsense": 1}, "unknown key 'nonsense'"),
    ],
)
def test_config_errors_point_at_the_field(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data, environ={})
    assert needle in str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("backend: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top, environ={})


# -- the registry --------------------------------------------------------------------------


def test_adapters_are_imported_lazily() -> None:
    code = (
        "import sys, flexkv_store.backends as b;"
        "a = b.open_adapter('memory://');"
        "print(sorted(m for m in sys.modules if m.startswith('flexkv_store.backends._')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)
    assert "flexkv_store.backends._memory" in loaded
    assert "flexkv_store.backends._redis" not in loaded
    assert "flexkv_store.backends._s3" not in loaded
    assert set(available_adapters()) >= {"memory", "fs", "redis", "s3", "gds"}


def test_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry._registry,
        "redis",
        registry.AdapterSpec(
            "redis", "flexkv_store_no_such_module:Thing", RedisConfig, extra="redis"
        ),
    )
    with pytest.raises(BackendUnavailableError) as info:
        open_adapter("redis://127.0.0.1:6379/0")
    assert "pip install 'flexkv-store[redis]'" in str(info.value)


class PluginConfig(FsConfig):
    """A third-party adapter's config (reuses fs keys for the test)."""

    type: str = "plugin"  # type: ignore[assignment]


class PluginAdapter(MemoryAdapter):
    name = "plugin"
    config_class = PluginConfig  # type: ignore[assignment]

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        self.plugin_config = config


def test_register_adapter_and_clobber(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    register_adapter("plugin", f"{__name__}:PluginAdapter", PluginConfig)
    a = open_adapter({"type": "plugin", "path": "/x"})
    assert isinstance(a, PluginAdapter)
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("plugin", "other.module:Other", PluginConfig)
    register_adapter("plugin", "other.module:Other", PluginConfig, clobber=True)


def test_entry_point_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEntryPoint:
        name = "plugin"
        value = f"{__name__}:PluginAdapter"

        def load(self) -> type[PluginAdapter]:
            return PluginAdapter

    class BrokenEntryPoint:
        name = "broken"
        value = "nowhere:Nothing"

        def load(self) -> Any:
            raise ImportError("nope")

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [FakeEntryPoint(), BrokenEntryPoint()]
    )
    assert "plugin" in available_adapters()
    assert "broken" not in available_adapters()
    assert isinstance(open_adapter({"type": "plugin", "path": "/p"}), PluginAdapter)


def test_env_backend_url_and_keys_in_any_order() -> None:
    env = {"FLEXKV_STORE_BACKEND__PASSWORD": "pw", "FLEXKV_STORE_BACKEND": "redis://h:6379/0"}
    for items in (list(env.items()), list(reversed(env.items()))):
        cfg = load_config(None, environ=dict(items))
        backend = cfg.adapters[0]
        assert isinstance(backend, RedisConfig)
        assert backend.password is not None
        assert backend.password.get_secret_value() == "pw"
