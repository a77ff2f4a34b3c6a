"""The s3 adapter against moto_server: the conformance suite plus naming, multipart,
ranged reads, listing and the thread-pool seam."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import boto3
import pytest
from servers import MotoServer, unique_prefix

from flexkv_store.backends import S3Config, open_adapter
from flexkv_store.backends._s3 import S3Adapter
from flexkv_store.backends.base import L2Adapter
from flexkv_store.backends.testing import AdapterTests
from flexkv_store.errors import StorageError
from flexkv_store.keyformat import ObjectKey, frame

Factory = Callable[[], Awaitable[L2Adapter]]
BUCKET = "flexkv-test"
MIB = 1 << 20


def _key(i: int, salt: str = "", model: str = "org/model") -> ObjectKey:
    return ObjectKey(model, 0, i.to_bytes(4, "big"), salt)


@pytest.fixture(scope="session")
def s3_bucket(moto_server: MotoServer) -> str:
    client = boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture
def s3_config(moto_server: MotoServer, s3_bucket: str) -> Iterator[Callable[..., S3Config]]:
    prefixes: list[str] = []

    def make(**overrides: Any) -> S3Config:
        fields: dict[str, Any] = {
            "bucket": s3_bucket,
            "prefix": unique_prefix(),
            "endpoint_url": moto_server.endpoint_url,
            "region": "us-east-1",
            "addressing_style": "path",
            "access_key_id": "test",
            "secret_access_key": "test",
            "max_concurrency": 4,
        }
        fields.update(overrides)
        prefixes.append(fields["prefix"])
        return S3Config(**fields)

    yield make
    # moto keeps objects in memory: drop what this test stored.
    client = boto3.resource(
        "s3",
        endpoint_url=moto_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    for prefix in prefixes:
        client.Bucket(s3_bucket).objects.filter(Prefix=prefix).delete()


class TestS3Adapter(AdapterTests):
    """The conformance suite on moto (path-style addressing, explicit credentials)."""

    @pytest.fixture
    def adapter_factory(self, s3_config: Callable[..., S3Config]) -> Factory:
        async def make() -> L2Adapter:
            return S3Adapter(s3_config())

        return make

    async def backdoor_read(self, adapter: L2Adapter, key: ObjectKey) -> bytes | None:
        a = cast(S3Adapter, adapter)
        try:
            resp = await asyncio.to_thread(
                a.client.get_object, Bucket=a.config.bucket, Key=a.object_name(key)
            )
        except a.client.exceptions.NoSuchKey:
            return None
        return cast(bytes, resp["Body"].read())

    async def backdoor_write(self, adapter: L2Adapter, key: ObjectKey, raw: bytes) -> None:
        a = cast(S3Adapter, adapter)
        await asyncio.to_thread(
            a.client.put_object, Bucket=a.config.bucket, Key=a.object_name(key), Body=raw
        )


async def _raw(a: S3Adapter, name: str) -> bytes:
    resp = await asyncio.to_thread(a.client.get_object, Bucket=a.config.bucket, Key=name)
    return cast(bytes, resp["Body"].read())


async def test_stored_form(s3_config: Callable[..., S3Config]) -> None:
    async with S3Adapter(s3_config()) as a:
        key = _key(1, "alice")
        await a.put(key, b"payload")
        name = a.config.prefix + key.to_wire()
        assert a.object_name(key) == name
        header, _ = frame(key, b"payload")
        assert await _raw(a, name) == header + b"payload"


async def test_overlong_names_are_hashed_and_scanned(s3_config: Callable[..., S3Config]) -> None:
    # A prefix that pushes prefix + wire past S3's 1024-byte limit.
    base = s3_config().prefix
    async with S3Adapter(s3_config(prefix=base + "p" * 600 + "/")) as a:
        long_key = ObjectKey("m" * 512, 7, b"\xab" * 64, "tenant")
        short_key = _key(2)
        await a.put(long_key, b"long")
        await a.put(short_key, b"short")
        wire = long_key.to_wire()
        name = a.object_name(long_key)
        assert name == a.config.prefix + f"h-{hashlib.sha256(wire.encode()).hexdigest()}.data"
        assert len(name.encode()) <= 1024
        assert await a.get(long_key) == b"long"
        assert await a.size(long_key) == 4
        infos = {i.key: i.size async for i in a.scan()}
        assert infos == {long_key: 4, short_key: 5}
        assert {i.key async for i in a.scan(model_name="m" * 512)} == {long_key}
        assert {i.key async for i in a.scan(cache_salt="")} == {short_key}
        assert await a.delete(long_key) is True
        assert [i.key async for i in a.scan()] == [short_key]


async def test_multipart_upload_and_ranged_reads(s3_config: Callable[..., S3Config]) -> None:
    cfg = s3_config(multipart_threshold=5 * MIB, part_size=5 * MIB)
    async with S3Adapter(cfg) as a:
        key = _key(3)
        data = bytes(range(256)) * (17 * MIB // 256) + b"tail"
        await a.put(key, data)
        head = await asyncio.to_thread(
            a.client.head_object, Bucket=cfg.bucket, Key=a.object_name(key)
        )
        assert str(head["ETag"]).strip('"').endswith("-4"), "expected a 4-part upload"
        assert await a.get(key) == data
        out = bytearray(len(data) + 10)
        assert await a.get_into(key, out) == len(data)
        assert out[: len(data)] == data
        assert await a.size(key) == len(data)
        uploads = await asyncio.to_thread(a.client.list_multipart_uploads, Bucket=cfg.bucket)
        assert not [u for u in uploads.get("Uploads", []) if u["Key"] == a.object_name(key)]


async def test_failed_multipart_upload_is_aborted(s3_config: Callable[..., S3Config]) -> None:
    cfg = s3_config(multipart_threshold=5 * MIB, part_size=5 * MIB, max_attempts=1)
    async with S3Adapter(cfg) as a:
        key = _key(4)
        await a.put(key, b"old version")
        real = a.client.upload_part
        calls = 0
        lock = threading.Lock()

        def flaky(**kwargs: Any) -> Any:
            nonlocal calls
            with lock:
                calls += 1
                n = calls
            if n == 2:
                raise a.client.exceptions.NoSuchUpload(
                    {"Error": {"Code": "AccessDenied", "Message": "injected"}}, "UploadPart"
                )
            return real(**kwargs)

        a.client.upload_part = flaky
        with pytest.raises(StorageError):
            await a.put(key, b"x" * (12 * MIB))
        a.client.upload_part = real
        assert await a.get(key) == b"old version", "a failed upload leaves the old object"
        uploads = await asyncio.to_thread(a.client.list_multipart_uploads, Bucket=cfg.bucket)
        assert not [u for u in uploads.get("Uploads", []) if u["Key"] == a.object_name(key)]


async def test_scan_pages_and_ignores_foreign_objects(s3_config: Callable[..., S3Config]) -> None:
    async with S3Adapter(s3_config(max_concurrency=16)) as a:
        a.list_page_size = 16
        keys = [_key(i, salt="s" if i % 3 == 0 else "") for i in range(70)]  # several pages
        await a.put_many((k, b"v" * (i % 7)) for i, k in enumerate(keys))
        for junk in ("not-a-key", "m@00000000@zz", "h-notahash.data"):
            await asyncio.to_thread(
                a.client.put_object, Bucket=a.config.bucket, Key=a.config.prefix + junk, Body=b"j"
            )
        infos = {i.key: i.size async for i in a.scan()}
        assert infos == {k: i % 7 for i, k in enumerate(keys)}
        salted = {i.key async for i in a.scan(cache_salt="s")}
        assert salted == {k for k in keys if k.cache_salt == "s"}
        assert await a.delete_many(keys[:5] + keys[:1]) == [True] * 5 + [False]


async def test_url_config_and_info(moto_server: MotoServer, s3_bucket: str) -> None:
    prefix = unique_prefix()
    url = (
        f"s3://{s3_bucket}/{prefix}?endpoint_url={moto_server.endpoint_url}"
        "&addressing_style=path&region=us-east-1&access_key_id=AKIDEXAMPLE"
        "&secret_access_key=hunter2secret"
    )
    async with open_adapter(url) as a:
        assert isinstance(a, S3Adapter)
        await a.put(_key(5), b"via url")
        assert await a.get(_key(5)) == b"via url"
        info = a.info()
        assert "hunter2secret" not in repr(info)
        assert info["credentials"] == "explicit"
        await a.delete(_key(5))


async def test_loop_is_not_blocked(s3_config: Callable[..., S3Config]) -> None:
    """Requests run in the pool: the loop keeps ticking during a batch."""
    async with S3Adapter(s3_config()) as a:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        keys = [_key(i) for i in range(40)]
        await a.put_many((k, b"z" * 100_000) for k in keys)
        assert await a.get_many(keys) == [b"z" * 100_000] * 40
        stop.set()
        await task
        assert ticks > 10


def test_default_credentials_chain(
    monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer, s3_bucket: str
) -> None:
    """Without explicit keys the adapter uses boto3's chain (here: the environment)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    cfg = S3Config(
        bucket=s3_bucket,
        prefix=unique_prefix(),
        endpoint_url=moto_server.endpoint_url,
        region="us-east-1",
        addressing_style="path",
    )

    async def go() -> None:
        async with S3Adapter(cfg) as a:
            assert a.client._request_signer._credentials.access_key == "from-env"
            await a.put(_key(6), b"chain")
            assert await a.get(_key(6)) == b"chain"
            assert a.info()["credentials"] == "default chain"
            await a.delete(_key(6))

    asyncio.run(go())


async def test_check_without_repair_keeps_corrupt_objects(
    s3_config: Callable[..., S3Config],
) -> None:
    async with S3Adapter(s3_config()) as a:
        key = ObjectKey("m", 0, b"\x01", "fsck")
        await a.put(key, b"payload" * 10)
        raw = bytearray(await TestS3Adapter().backdoor_read(a, key) or b"")
        raw[-1] ^= 1
        await TestS3Adapter().backdoor_write(a, key, bytes(raw))
        report = await a.check()
        assert report.corrupt == [key.to_wire()]
        assert await TestS3Adapter().backdoor_read(a, key) is not None, "check changed nothing"
        report = await a.check(repair=True)
        assert report.removed == 1
        assert await TestS3Adapter().backdoor_read(a, key) is None
