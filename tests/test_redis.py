"""The redis adapter against real servers: the conformance suite (TCP and Cluster) plus
what is specific to Redis (stored form, unix socket, URLs, error mapping, batch shapes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
import redis
import redis.cluster
from servers import RedisCluster, RedisServer, free_port, unique_prefix

from flexkv_store.backends import RedisConfig, open_adapter
from flexkv_store.backends._redis import RedisAdapter
from flexkv_store.backends.base import L2Adapter
from flexkv_store.backends.testing import AdapterTests
from flexkv_store.errors import BackendUnavailableError, StorageError
from flexkv_store.keyformat import ObjectKey, frame

Factory = Callable[[], Awaitable[L2Adapter]]


def _key(i: int, salt: str = "") -> ObjectKey:
    return ObjectKey("org/model", 0, i.to_bytes(4, "big"), salt)


def _purge(client: Any, prefixes: list[str]) -> None:
    """Delete what the tests stored, so 64 MiB objects do not pile up in the server."""
    for prefix in prefixes:
        for name in client.scan_iter(match=prefix.encode() + b"*", count=1000):
            client.unlink(name)


@pytest.fixture
def redis_config(redis_server: RedisServer) -> Iterator[Callable[..., RedisConfig]]:
    prefixes: list[str] = []

    def make(**overrides: Any) -> RedisConfig:
        prefixes.append(overrides.get("key_prefix", unique_prefix()))
        fields: dict[str, Any] = {"port": redis_server.port, "key_prefix": prefixes[-1]}
        fields.update(overrides)
        return RedisConfig(**fields)

    yield make
    with redis.Redis(port=redis_server.port) as client:
        _purge(client, prefixes)


class _Backdoor:
    async def backdoor_read(self, adapter: L2Adapter, key: ObjectKey) -> bytes | None:
        a = cast(RedisAdapter, adapter)
        return cast("bytes | None", await a.client.get(a.redis_key(key)))

    async def backdoor_write(self, adapter: L2Adapter, key: ObjectKey, raw: bytes) -> None:
        a = cast(RedisAdapter, adapter)
        await a.client.set(a.redis_key(key), raw)


class TestRedisAdapter(_Backdoor, AdapterTests):
    """Standalone server over TCP."""

    @pytest.fixture
    def adapter_factory(self, redis_config: Callable[..., RedisConfig]) -> Factory:
        async def make() -> L2Adapter:
            return RedisAdapter(redis_config())

        return make


class TestRedisClusterAdapter(_Backdoor, AdapterTests):
    """Three-primary Redis Cluster: batches and scans span every node."""

    @pytest.fixture
    def adapter_factory(self, redis_cluster: RedisCluster) -> Iterator[Factory]:
        prefixes: list[str] = []

        async def make() -> L2Adapter:
            prefixes.append(unique_prefix())
            return RedisAdapter(
                RedisConfig(
                    cluster=True, nodes=redis_cluster.startup_nodes, key_prefix=prefixes[-1]
                )
            )

        yield make
        host, port = redis_cluster.startup_nodes[0].split(":")
        with redis.cluster.RedisCluster(host=host, port=int(port)) as client:
            _purge(client, prefixes)


# -- standalone specifics ----------------------------------------------------------------------


async def test_stored_form_is_prefix_plus_wire_and_framed(
    redis_config: Callable[..., RedisConfig],
) -> None:
    async with RedisAdapter(redis_config()) as a:
        key = _key(1, "alice")
        await a.put(key, b"payload")
        name = a.config.key_prefix.encode() + key.to_wire().encode()
        raw = await a.client.get(name)
        header, _ = frame(key, b"payload")
        assert raw == header + b"payload"
        assert len(header) == 32 + len(key.to_wire().encode())
        assert a.info()["server_version"]


async def test_unix_socket(
    redis_server: RedisServer, redis_config: Callable[..., RedisConfig]
) -> None:
    assert redis_server.unix_socket is not None
    cfg = redis_config(unix_socket=redis_server.unix_socket, port=1)
    async with RedisAdapter(cfg) as a:
        keys = [_key(i) for i in range(20)]
        await a.put_many((k, bytes([i]) * (i * 1000)) for i, k in enumerate(keys))
        assert await a.get_many(keys) == [bytes([i]) * (i * 1000) for i in range(20)]
        assert {i.key for i in [x async for x in a.scan()]} == set(keys)
        assert a.info()["mode"] == "unix"


async def test_url_config(
    redis_server: RedisServer, redis_config: Callable[..., RedisConfig]
) -> None:
    prefix = redis_config().key_prefix  # registers the prefix for clean-up
    url = f"redis://127.0.0.1:{redis_server.port}/0?key_prefix={prefix}&socket_timeout=2"
    async with open_adapter(url) as a:
        assert isinstance(a, RedisAdapter)
        await a.put(_key(2), b"via url")
        assert await a.get(_key(2)) == b"via url"


async def test_batches_mix_small_and_large_values(
    redis_config: Callable[..., RedisConfig],
) -> None:
    # pipeline_value_limit splits the batch: small values pipelined, large ones alone.
    async with RedisAdapter(redis_config(pipeline_value_limit=10_000)) as a:
        sizes = [0, 5, 9_999, 10_001, 300_000, 17, 2_000_000, 1]
        keys = [_key(10 + i) for i in range(len(sizes))]
        datas = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
        await a.put_many(zip(keys, datas, strict=True))
        assert await a.get_many(keys) == datas
        many = [_key(100 + i) for i in range(100)]  # more than one MGET group
        await a.put_many((k, k.chunk_hash * 1000) for k in many)
        assert await a.get_many(many) == [k.chunk_hash * 1000 for k in many]
        assert [await a.size(k) for k in many] == [4000] * 100


async def test_corrupt_object_counted_and_deleted(redis_config: Callable[..., RedisConfig]) -> None:
    async with RedisAdapter(redis_config()) as a:
        key = _key(20)
        await a.put(key, b"good payload")
        name = a.redis_key(key)
        raw = cast(bytes, await a.client.get(name))
        await a.client.set(name, raw[:-1] + b"X")
        assert await a.get(key) is None
        assert a.corrupt_objects == 1
        assert await a.client.exists(name) == 0, "a corrupt object is deleted"
        # A header that does not match the stored length: size() sees it without the payload.
        await a.client.set(name, raw + b"extra")
        assert await a.size(key) is None
        assert a.corrupt_objects == 2
        assert await a.client.exists(name) == 0


async def test_corrupt_delete_spares_a_newer_value(
    redis_config: Callable[..., RedisConfig],
) -> None:
    """The compare-and-delete removes only the value that failed, not a fresh re-put."""
    async with RedisAdapter(redis_config()) as a:
        key = _key(21)
        name = a.redis_key(key)
        await a.client.set(name, b"garbage that is not an object")
        stale = cast(bytes, await a.client.get(name))
        await a.put(key, b"fresh")  # another writer replaced it before the cleanup ran
        assert await a._verified(key, name, stale) is None
        assert await a.get(key) == b"fresh"


async def test_scan_ignores_foreign_keys_and_escapes_the_prefix(
    redis_config: Callable[..., RedisConfig],
) -> None:
    base = redis_config().key_prefix
    async with (
        RedisAdapter(redis_config(key_prefix=base + "a*[b]/")) as star,
        RedisAdapter(redis_config(key_prefix=base + "aX[b]/")) as other,
    ):
        await star.put(_key(30), b"1")
        await other.put(_key(31), b"22")
        await star.client.set(star.config.key_prefix + "not-a-wire-key", b"x")
        await star.client.set(star.config.key_prefix + "m@00000000@zz", b"x")
        infos = [i async for i in star.scan()]
        assert [(i.key, i.size) for i in infos] == [(_key(30), 1)]
        assert abs(infos[0].last_modified - time.time()) < 5


async def test_error_mapping(
    redis_config: Callable[..., RedisConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RedisAdapter(redis_config()) as a:
        key = _key(40)
        # A value that is not a string is another program's: a miss, left alone.
        await a.client.rpush(a.redis_key(key), b"a list, not a string")
        assert await a.get(key) is None
        assert await a.get_many([key, key]) == [None, None]
        assert await a.size(key) is None
        assert await a.delete(key) is False
        assert a.foreign_objects >= 2  # get and size (MGET answers nil for it)
        assert await a.client.lrange(a.redis_key(key), 0, -1) == [b"a list, not a string"]

        async def refused(*args: object, **kw: object) -> None:
            raise redis.exceptions.ResponseError("ERR something the server refused")

        monkeypatch.setattr(a.client, "get", refused)
        with pytest.raises(StorageError) as info:
            await a.get(key)
        assert not isinstance(info.value, BackendUnavailableError)
        assert isinstance(info.value.__cause__, redis.exceptions.ResponseError)


async def test_closed_port_is_unavailable_quickly() -> None:
    cfg = RedisConfig(port=free_port(), socket_timeout=1.0)
    async with RedisAdapter(cfg) as a:
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await a.get(_key(50))
        with pytest.raises(BackendUnavailableError):
            await a.put_many([(_key(51), b"x"), (_key(52), b"y")])
        assert time.monotonic() - start < 3 * 2 * cfg.socket_timeout


def test_info_has_no_secrets() -> None:
    cfg = RedisConfig.model_validate(
        {"url": "redis://user:hunter2@127.0.0.1:1/0", "password": "hunter2", "username": "user"}
    )
    a = RedisAdapter(cfg)
    assert "hunter2" not in repr(a.info())
    asyncio.run(a.aclose())


# -- cluster specifics -------------------------------------------------------------------------


async def test_cluster_batches_and_scan_span_all_nodes(redis_cluster: RedisCluster) -> None:
    prefix = unique_prefix()
    cfg = RedisConfig(cluster=True, nodes=redis_cluster.startup_nodes, key_prefix=prefix)
    async with RedisAdapter(cfg) as a:
        keys = [_key(i) for i in range(60)]
        await a.put_many((k, k.chunk_hash) for k in keys)
        client = cast(Any, a.client)
        nodes = {client.get_node_from_key(a.redis_key(k)).name for k in keys}
        assert len(nodes) == 3, "60 keys should land on every primary"
        assert await a.get_many(keys) == [k.chunk_hash for k in keys]
        assert await a.exists_many(keys) == [True] * 60
        assert {i.key for i in [x async for x in a.scan()]} == set(keys)
        assert await a.delete_many(keys) == [True] * 60
        assert a.info()["mode"] == "cluster"


def test_retry_policy_is_the_asyncio_one() -> None:
    """redis-py's sync Retry on an asyncio client would return coroutines unretried."""
    import redis.asyncio.retry

    a = RedisAdapter(RedisConfig(port=1))
    retry = cast(Any, a.client).get_retry()
    assert isinstance(retry, redis.asyncio.retry.Retry)
    assert retry._retries == 2
    asyncio.run(a.aclose())


async def test_check_without_repair_keeps_corrupt_objects(
    redis_config: Callable[..., RedisConfig],
) -> None:
    backdoor = TestRedisAdapter()
    async with RedisAdapter(redis_config()) as a:
        key = ObjectKey("m", 0, b"\x01", "fsck")
        await a.put(key, b"payload" * 10)
        raw = bytearray(await backdoor.backdoor_read(a, key) or b"")
        raw[-1] ^= 1
        await backdoor.backdoor_write(a, key, bytes(raw))
        report = await a.check()
        assert report.corrupt == [key.to_wire()]
        assert await backdoor.backdoor_read(a, key) is not None, "check changed nothing"
        report = await a.check(repair=True)
        assert report.removed == 1
        assert await backdoor.backdoor_read(a, key) is None
