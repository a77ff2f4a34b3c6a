"""The s3 adapter: boto3 (AWS S3, MinIO, Ceph RGW, moto), run off the event loop.

Every request runs in a thread pool of ``max_concurrency`` workers, so the event loop
never blocks on the network. Each object is ``header + payload`` (the unpadded frame
header, ``32 + len(wire)`` bytes) under ``prefix + wire string``; when that name exceeds
S3's 1024-byte limit the object is stored as ``prefix + h-<sha256(wire)>.data`` instead,
and ``scan`` reads the key back from the header with a ranged GET.

Large objects: uploads of ``multipart_threshold`` bytes or more go in parts of
``part_size``, in parallel, aborted on failure (so no half-written object is ever
visible); reads of objects larger than ``part_size`` fetch the remaining ranges in
parallel, pinned to the first response's ETag so that a concurrent overwrite cannot mix
two versions.

Retries: botocore's own retries are switched off and one loop here retries throttling
(503 SlowDown, 429), other 5xx, timeouts and dropped connections (including a body that
breaks off mid-read, which botocore does not retry) with capped exponential backoff and
full jitter, up to ``max_attempts`` attempts per request. What still fails is mapped at
one seam: unreachable or overloaded service -> BackendUnavailableError, NoSuchKey -> a
miss, anything else -> StorageError.

Data we did not write (DESIGN section 14). An object under the prefix is ours only if it
starts with our magic and its header names the key its name parses to, so a deployment
under a longer prefix (``prod/canary/`` seen from ``prod/``, whose names parse as model
``canary/m``) or another program's object is *foreign*: a miss for reads
(``foreign_objects``), skipped by ``scan`` (never accounted or evicted; listing therefore
costs one ranged GET of the header per object), reported by ``check`` and removed only by
``check(remove_foreign=True)``. ``delete`` reads the header first and removes only ours
(S3 has no compare-and-delete, so an overwrite in the milliseconds between the two
requests is the one window left).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import random
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, ClassVar, Final, TypeVar

import boto3
import botocore.config
import botocore.exceptions as bexc
import botocore.loaders
import botocore.session
import urllib3.exceptions

from flexkv_store._aio import settle
from flexkv_store._threads import worker_pool
from flexkv_store.backends.base import (
    Buffer,
    Capabilities,
    L2Adapter,
    ObjectInfo,
    check_key,
    writable_view,
)
from flexkv_store.backends.config import S3Config
from flexkv_store.errors import (
    BackendUnavailableError,
    BufferTooSmallError,
    CorruptObjectError,
    StorageError,
)
from flexkv_store.keyformat import ObjectKey, decode_header, frame, overlong_filename, unframe
from flexkv_store.keyformat._framing import MAGIC, MIN_HEADER_LEN, header_key_length

__all__ = ["S3Adapter"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: S3's limit on object names, in UTF-8 bytes.
S3_KEY_MAX: Final = 1024
#: Enough bytes for any header: 32 fixed + the longest wire key (512-byte model, 8-digit
#: rank, 128 hex digits, 128 salt characters of up to 4 bytes, 3 separators).
_MAX_HEADER: Final = 2048
#: Backoff between attempts: full jitter over min(cap, base * 2**attempt) seconds.
_BACKOFF_BASE: Final = 0.05
_BACKOFF_CAP: Final = 2.0
_RETRY_CODES: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "TooManyRequests",
        "RequestLimitExceeded",
    }
)
_MISS_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound", "InvalidRange"})
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
#: An object name's rest (after the prefix) in the hashed form used past 1024 bytes.
_HASHED = re.compile(r"h-[0-9a-f]{64}\.data")
#: What _listed_info returns for an object that is not ours.
_FOREIGN: Final = object()

# botocore's loader caches the parsed service models (S3's is ~1 MB of JSON): sharing it
# makes opening an adapter ~4x cheaper. Credentials are still resolved per adapter.
_LOADER_LOCK = threading.Lock()
_loader: Any = None


def _botocore_session() -> Any:
    global _loader
    with _LOADER_LOCK:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        session = botocore.session.Session()
        session.register_component("data_loader", _loader)
        return session


def _code(exc: bexc.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(err.get("Code", "")), int(status or 0)


def _retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: throttling, 5xx, timeouts, broken connections."""
    if isinstance(exc, bexc.ClientError):
        code, status = _code(exc)
        return code in _RETRY_CODES or status == 429 or status >= 500
    return isinstance(
        exc,
        (
            bexc.ConnectionError,
            bexc.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, streaming errors
            bexc.IncompleteReadError,
            # A body cut off mid-read surfaces from urllib3 / http.client, unwrapped.
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
        ),
    )


def _is_miss(exc: BaseException) -> bool:
    if not isinstance(exc, bexc.ClientError):
        return False
    code, status = _code(exc)
    return code in _MISS_CODES or status in (404, 416)


def _map(exc: BaseException, what: str) -> StorageError:
    """The one place botocore (and socket) exceptions become flexkv-store errors."""
    if isinstance(exc, StorageError):
        return exc
    if _retryable(exc):
        return BackendUnavailableError(f"s3: {what}: {type(exc).__name__}: {exc}")
    return StorageError(f"s3: {what}: {type(exc).__name__}: {exc}")


class _Changed(Exception):
    """The object changed between the ranged GETs of one read (ETag no longer matches)."""


class _Miss(Exception):
    """The object is absent (404), or empty so that no byte range exists (416)."""


class S3Adapter(L2Adapter):
    """Objects as framed S3 objects; see the module docstring for naming and retries.

    Batches run their requests with at most ``max_concurrency`` in flight (the size of
    the thread pool), the same bound that limits parts and ranges of large objects.
    """

    name = "s3"
    capabilities: ClassVar[Capabilities] = Capabilities(
        listing=True, shared_across_processes=True, persistent=True, verifies_checksums=True
    )
    config_class = S3Config
    #: Names per ListObjectsV2 page (S3's maximum; tests lower it to cover paging).
    list_page_size = 1000

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.batch_concurrency = config.max_concurrency
        self._pool = worker_pool(config.max_concurrency, "flexkv-s3")
        self._client = self._make_client()
        self._closed = False
        self._lock = threading.Lock()
        #: Objects that failed their header or checksum check (each was a miss).
        self.corrupt_objects = 0
        #: Objects at an object's name that are not ours (each was a miss, left alone).
        self.foreign_objects = 0
        #: Attempts that failed and were retried.
        self.retries = 0

    def _make_client(self) -> Any:
        cfg = self.config
        session = boto3.session.Session(
            botocore_session=_botocore_session(),
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=(
                cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None
            ),
            aws_session_token=cfg.session_token.get_secret_value() if cfg.session_token else None,
            region_name=cfg.region,
        )
        bconfig = botocore.config.Config(
            region_name=cfg.region,
            s3={"addressing_style": cfg.addressing_style},
            # Retries are ours (see the module docstring): one attempt per botocore call.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            # One connection per worker thread, plus slack for parts of a multipart upload.
            max_pool_connections=cfg.max_concurrency + 4,
            # Payloads carry our own xxh3 checksum, verified on every read; a second CRC
            # on each request and response only costs CPU.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        with _LOADER_LOCK:
            return session.client(
                "s3",
                endpoint_url=cfg.endpoint_url,
                verify=cfg.ca_bundle if cfg.ca_bundle else None,
                config=bconfig,
            )

    @property
    def client(self) -> Any:
        """The boto3 S3 client (for tests and tools; not part of the adapter contract)."""
        return self._client

    def object_name(self, key: ObjectKey) -> str:
        """``prefix + wire``, or ``prefix + h-<sha256(wire)>.data`` past 1024 bytes."""
        wire = check_key(key).to_wire()
        name = self.config.prefix + wire
        if len(name.encode("utf-8")) > S3_KEY_MAX:
            return self.config.prefix + overlong_filename(wire)
        return name

    # -- the request seam --------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[], _T], *, misses: bool = False) -> _T:
        """Run ``fn`` in the pool, retrying transient failures with backoff and jitter.

        With ``misses``, an absent object raises :class:`_Miss` for the caller to turn
        into ``None`` / ``False``; otherwise every failure leaves as a StorageError.
        """
        if self._closed:
            raise StorageError("s3: adapter is closed")
        loop = asyncio.get_running_loop()
        attempts = self.config.max_attempts
        for attempt in range(attempts):
            try:
                # settle: fn may read the caller's buffer in the pool thread
                return await settle(loop.run_in_executor(self._pool, fn))
            except (_Changed, StorageError):
                raise
            except Exception as exc:
                if misses and _is_miss(exc):
                    raise _Miss(what) from exc
                if not _retryable(exc) or attempt + 1 >= attempts:
                    raise _map(exc, what) from exc
                self.retries += 1
                delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
                log.debug("s3: %s failed (%s), retrying in %.3f s", what, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- reading -----------------------------------------------------------------------

    def _get_range(self, name: str, start: int, end: int, etag: str | None) -> tuple[bytes, Any]:
        kwargs: dict[str, Any] = {"Bucket": self.config.bucket, "Key": name}
        kwargs["Range"] = f"bytes={start}-{end}"
        if etag is not None:
            kwargs["IfMatch"] = etag
        try:
            resp = self._client.get_object(**kwargs)
        except bexc.ClientError as exc:
            if etag is not None and _code(exc)[1] == 412:
                raise _Changed from exc
            raise
        with resp["Body"] as body:
            data: bytes = body.read()
        return data, resp

    async def _fetch(self, name: str) -> bytes | bytearray | None:
        """The whole stored object (header + payload), or None if absent."""
        for _ in range(self.config.max_attempts):
            try:
                return await self._fetch_once(name)
            except _Changed:
                continue  # overwritten while we read its ranges: read the new version
        return None

    def _get_first(self, name: str) -> tuple[bytes | None, Any]:
        """A plain GET: the body if it is at most one part, else None (body not read).

        A plain GET rather than a ranged one: objects of one part (the common case) come
        back in one request either way, and some servers (moto: ~15%) serve ranges slower.
        """
        resp = self._client.get_object(Bucket=self.config.bucket, Key=name)
        with resp["Body"] as body:
            if int(resp["ContentLength"]) > self.config.part_size:
                return None, resp  # closing unread drops the connection: only for big objects
            data: bytes = body.read()
        return data, resp

    async def _fetch_once(self, name: str) -> bytes | bytearray | None:
        part = self.config.part_size
        try:
            first, resp = await self._call("get", lambda: self._get_first(name), misses=True)
        except _Miss:
            return None
        if first is not None:
            return first
        total = int(resp["ContentLength"])
        etag = str(resp["ETag"])
        buf = bytearray(total)
        view = memoryview(buf)

        async def fetch(start: int) -> None:
            end = min(start + part, total) - 1
            try:
                data, _ = await self._call(
                    "get range", lambda: self._get_range(name, start, end, etag), misses=True
                )
            except _Miss as exc:
                raise _Changed from exc  # deleted mid-read: read again (then it is a miss)
            if len(data) != end - start + 1:
                raise _Changed
            view[start : end + 1] = data

        starts = range(0, total, part)
        results = await asyncio.gather(*(fetch(s) for s in starts), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return buf

    def _verify(
        self, key: ObjectKey, name: str, raw: bytes | bytearray
    ) -> tuple[memoryview | None, bool]:
        """``(payload, False)`` if verified, else ``(None, whether it is ours and corrupt)``.

        Only a corrupt object of ours (it starts with our magic) may be dropped; one that
        is not ours is a miss and stays as it is.
        """
        if bytes(raw[: len(MAGIC)]) != MAGIC:
            self._foreign(name, "it does not start with our magic")
            return None, False
        try:
            # Whose it is first: another key's object stays foreign even if damaged.
            header = decode_header(raw)
            if header.key != key:
                self._foreign(name, f"its header names {header.key.to_wire()!r}")
                return None, False
            _, payload = unframe(raw)
        except CorruptObjectError as exc:
            self._corrupt(name, exc)
            return None, True
        return payload, False

    def _corrupt(self, name: str, why: object) -> None:
        with self._lock:
            self.corrupt_objects += 1
        log.warning("s3: corrupt object %r treated as a miss: %s", name, why)

    def _foreign(self, name: str, why: object) -> None:
        with self._lock:
            self.foreign_objects += 1
        log.debug("s3: %r is not ours (%s); a miss, left alone", name, why)

    async def _drop(self, name: str) -> None:
        # S3 has no compare-and-delete; a corrupt object is removed unconditionally. A
        # writer that replaced it in the last milliseconds loses its object: a later miss,
        # never wrong data.
        if not self.delete_corrupt:
            return
        try:
            await self._call(
                "delete corrupt object",
                lambda: self._client.delete_object(Bucket=self.config.bucket, Key=name),
            )
        except StorageError as exc:
            log.warning("s3: could not delete corrupt object %r: %s", name, exc)

    async def _payload(self, key: ObjectKey) -> memoryview | None:
        name = self.object_name(key)
        raw = await self._fetch(name)
        if raw is None:
            return None
        payload, corrupt = self._verify(key, name, raw)
        if corrupt:
            await self._drop(name)
        return payload

    async def get(self, key: ObjectKey) -> bytes | None:
        # docstring inherited
        payload = await self._payload(key)
        return None if payload is None else bytes(payload)

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        # docstring inherited
        view = writable_view(out)
        payload = await self._payload(key)
        if payload is None:
            return None
        n = payload.nbytes
        if n > view.nbytes:
            raise BufferTooSmallError(n, view.nbytes)
        view[:n] = payload
        return n

    async def size(self, key: ObjectKey) -> int | None:
        # docstring inherited
        # A ranged GET of the header (not a HEAD): the same one request, and it checks
        # that the object is ours and its length agrees with the header.
        name = self.object_name(key)
        hlen = MIN_HEADER_LEN + len(key.to_wire().encode("utf-8"))
        try:
            head, resp = await self._call(
                "size", lambda: self._get_range(name, 0, hlen - 1, None), misses=True
            )
        except _Miss as exc:
            if _code(exc.__cause__)[1] != 416:  # type: ignore[arg-type]
                return None
            head, resp = b"", {}  # a zero-byte object: corrupt
        m = _RANGE.fullmatch(str(resp.get("ContentRange", "")))
        total = int(m.group(3)) if m else len(head)
        if header_key_length(head) != hlen - MIN_HEADER_LEN:
            self._foreign(name, "not an object of ours under this name")
            return None
        try:
            header = decode_header(head)
            if header.key != key:
                self._foreign(name, f"its header names {header.key.to_wire()!r}")
                return None
            if header.payload_len != total - header.header_len:
                raise CorruptObjectError("the header does not match the object's length")
        except CorruptObjectError as exc:
            self._corrupt(name, exc)
            await self._drop(name)
            return None
        return header.payload_len

    async def exists(self, key: ObjectKey) -> bool:
        # docstring inherited
        return await self.size(key) is not None

    # -- writing -----------------------------------------------------------------------

    async def put(self, key: ObjectKey, data: Buffer) -> None:
        # docstring inherited
        name = self.object_name(key)
        header, payload = frame(key, data)
        total = len(header) + payload.nbytes
        bucket = self.config.bucket
        if total < self.config.multipart_threshold:
            # One bytes object: boto3 needs a seekable body it can resend on retry.
            body = header + payload
            await self._call(
                "put", lambda: self._client.put_object(Bucket=bucket, Key=name, Body=body)
            )
            return
        await self._put_multipart(name, header, payload)

    async def _put_multipart(self, name: str, header: bytes, payload: memoryview) -> None:
        bucket, part = self.config.bucket, self.config.part_size
        upload = await self._call(
            "create multipart upload",
            lambda: self._client.create_multipart_upload(Bucket=bucket, Key=name),
        )
        upload_id = upload["UploadId"]
        hlen, total = len(header), len(header) + payload.nbytes

        def body(start: int) -> bytes:
            # Part bodies are cut from header + payload without joining the whole object.
            end = min(start + part, total)
            if start >= hlen:
                return bytes(payload[start - hlen : end - hlen])
            return header[start:] + payload[: end - hlen]

        async def upload_part(number: int, start: int) -> dict[str, Any]:
            chunk = body(start)
            resp = await self._call(
                "upload part",
                lambda: self._client.upload_part(
                    Bucket=bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=chunk
                ),
            )
            return {"PartNumber": number, "ETag": resp["ETag"]}

        try:
            results = await asyncio.gather(
                *(upload_part(i + 1, s) for i, s in enumerate(range(0, total, part))),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            await self._call(
                "complete multipart upload",
                lambda: self._client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": results},
                ),
            )
        except BaseException:
            # Abort so the parts stop costing storage; the old object (if any) stays.
            try:
                await self._call(
                    "abort multipart upload",
                    lambda: self._client.abort_multipart_upload(
                        Bucket=bucket, Key=name, UploadId=upload_id
                    ),
                )
            except Exception as exc:
                log.warning("s3: could not abort multipart upload of %r: %s", name, exc)
            raise

    # -- delete ------------------------------------------------------------------------

    async def _head(self, name: str) -> bool:
        try:
            await self._call(
                "head",
                lambda: self._client.head_object(Bucket=self.config.bucket, Key=name),
                misses=True,
            )
        except _Miss:
            return False
        return True

    async def _ours(self, name: str, key: ObjectKey) -> bool:
        """Whether ``name`` holds an object of ours for ``key`` (its header, one ranged GET).

        A header of ours that no longer decodes is a corrupt object of ours: True.
        """
        hlen = MIN_HEADER_LEN + len(key.to_wire().encode("utf-8"))
        try:
            head, _ = await self._call(
                "delete", lambda: self._get_range(name, 0, hlen - 1, None), misses=True
            )
        except _Miss as exc:
            if _code(exc.__cause__)[1] == 416:  # type: ignore[arg-type]
                self._foreign(name, "an empty object")
            return False
        if header_key_length(head) != hlen - MIN_HEADER_LEN:
            self._foreign(name, "not an object of ours under this name; not deleted")
            return False
        try:
            if decode_header(head).key != key:
                self._foreign(name, "its header names another key; not deleted")
                return False
        except CorruptObjectError:
            pass
        return True

    async def delete(self, key: ObjectKey) -> bool:
        # docstring inherited
        # S3 answers 204 whether or not the object existed, so ask first (and whether it
        # is ours: another program's object is never deleted).
        name = self.object_name(key)
        existed = await self._ours(name, key)
        if existed:
            await self._call(
                "delete",
                lambda: self._client.delete_object(Bucket=self.config.bucket, Key=name),
            )
        return existed

    async def delete_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        # docstring inherited
        names = [self.object_name(k) for k in keys]
        pairs = list(zip(names, keys, strict=True))
        existed = await self._run_many(lambda nk: self._ours(*nk), pairs)
        doomed = sorted({n for n, e in zip(names, existed, strict=True) if e})
        bucket = self.config.bucket
        for i in range(0, len(doomed), 1000):  # DeleteObjects takes up to 1000 names
            batch = [{"Key": n} for n in doomed[i : i + 1000]]
            resp = await self._call(
                "delete_many",
                lambda batch=batch: self._client.delete_objects(  # type: ignore[misc]
                    Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            if resp.get("Errors"):
                err = resp["Errors"][0]
                raise StorageError(f"s3: delete_many: {err.get('Code')}: {err.get('Message')}")
        # A name given twice existed once: report True only for its first occurrence.
        seen: set[str] = set()
        out = []
        for n, e in zip(names, existed, strict=True):
            out.append(e and n not in seen)
            seen.add(n)
        return out

    # -- listing -----------------------------------------------------------------------

    async def scan(
        self, model_name: str | None = None, cache_salt: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        # docstring inherited
        async for infos, _ in self._scan_pages(model_name, cache_salt):
            for info in infos:
                yield info

    async def scan_foreign(self) -> AsyncIterator[str]:
        # docstring inherited
        async for _, foreign in self._scan_pages(None, None):
            for name in foreign:
                yield name

    async def remove_foreign(self, name: str) -> bool:
        # docstring inherited
        if not name.startswith(self.config.prefix):
            return False  # never outside our prefix
        existed = await self._head(name)
        if existed:
            await self._call(
                "remove foreign",
                lambda: self._client.delete_object(Bucket=self.config.bucket, Key=name),
            )
        return existed

    async def _scan_pages(
        self, model_name: str | None, cache_salt: str | None
    ) -> AsyncIterator[tuple[list[ObjectInfo], list[str]]]:
        """``(our objects, foreign names)`` for each listing page under the prefix."""
        prefix = self.config.prefix
        # Wire names start with the model name: list only that model's names (and the
        # hashed names, which may hold any key).
        listings = [prefix + model_name + "@", prefix + "h-"] if model_name else [prefix]
        for list_prefix in listings:
            token: str | None = None
            while True:
                page = await self._list_page(list_prefix, token)
                listed: list[tuple[str, int, float, ObjectKey | None]] = []
                foreign: list[str] = []
                for obj in page.get("Contents", []):
                    name, total = str(obj["Key"]), int(obj["Size"])
                    mtime = obj["LastModified"].timestamp()
                    rest = name[len(prefix) :]
                    if _HASHED.fullmatch(rest):
                        listed.append((name, total, mtime, None))
                        continue
                    try:
                        key = ObjectKey.from_wire(rest)
                    except ValueError:
                        foreign.append(name)
                        continue
                    if _wanted(key, model_name, cache_salt):
                        listed.append((name, total, mtime, key))
                infos = []
                for name, info in zip(
                    (item[0] for item in listed),
                    await self._run_many(self._listed_info, listed),
                    strict=True,
                ):
                    if info is _FOREIGN:
                        foreign.append(name)
                    elif isinstance(info, ObjectInfo) and _wanted(info.key, model_name, cache_salt):
                        infos.append(info)
                yield infos, foreign
                if not page.get("IsTruncated"):
                    break
                token = page.get("NextContinuationToken")

    async def _list_page(self, list_prefix: str, token: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "Bucket": self.config.bucket,
            "Prefix": list_prefix,
            "MaxKeys": self.list_page_size,
        }
        if token:
            kwargs["ContinuationToken"] = token
        page: dict[str, Any] = await self._call(
            "scan", lambda: self._client.list_objects_v2(**kwargs)
        )
        return page

    async def _listed_info(
        self, item: tuple[str, int, float, ObjectKey | None]
    ) -> ObjectInfo | object | None:
        """A listed object's info from its header (one ranged GET), or _FOREIGN, or None.

        ``key`` is what the name parses to (None for a hashed name, whose key only the
        header holds). Ours: our magic and a header naming that key (for a hashed name, a
        key whose hashed name this is). A header of ours that no longer decodes is listed
        (a read finds it corrupt); None when the object is gone since the listing.
        """
        name, total, mtime, key = item
        hlen = _MAX_HEADER if key is None else MIN_HEADER_LEN + len(key.to_wire().encode("utf-8"))
        try:
            head, _ = await self._call(
                "scan header", lambda: self._get_range(name, 0, hlen - 1, None), misses=True
            )
        except _Miss as exc:
            if _code(exc.__cause__)[1] == 416:  # type: ignore[arg-type]
                return _FOREIGN  # an empty object
            return None  # deleted since it was listed
        if head[: len(MAGIC)] != MAGIC:
            return _FOREIGN
        if key is not None and header_key_length(head) != hlen - MIN_HEADER_LEN:
            return _FOREIGN  # another key's header (e.g. a deployment under a shorter prefix)
        try:
            header = decode_header(head)
        except CorruptObjectError:
            if key is None:
                return None  # torn, and nothing says whose: a read of its key deals with it
            return ObjectInfo(key, max(0, total - hlen), mtime)
        if key is None:
            if self.config.prefix + overlong_filename(header.key.to_wire()) != name:
                return _FOREIGN  # a header that does not belong to this name
        elif header.key != key:
            return _FOREIGN  # e.g. a deployment under a longer prefix
        return ObjectInfo(header.key, total - header.header_len, mtime)

    # -- lifecycle ---------------------------------------------------------------------

    async def aclose(self) -> None:
        # docstring inherited
        if self._closed:
            return
        self._closed = True
        # Waiting for running requests would block the loop: do it in another thread.
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        await asyncio.to_thread(self._client.close)

    def info(self) -> dict[str, Any]:
        # docstring inherited
        cfg = self.config
        return {
            "adapter": self.name,
            "bucket": cfg.bucket,
            "prefix": cfg.prefix,
            "endpoint_url": cfg.endpoint_url,
            "region": self._client.meta.region_name,
            "addressing_style": cfg.addressing_style,
            "credentials": "explicit" if cfg.access_key_id else "default chain",
            "multipart_threshold": cfg.multipart_threshold,
            "part_size": cfg.part_size,
            "max_concurrency": cfg.max_concurrency,
            "max_attempts": cfg.max_attempts,
            "corrupt_objects": self.corrupt_objects,
            "retries": self.retries,
        }


def _wanted(key: ObjectKey, model_name: str | None, cache_salt: str | None) -> bool:
    return (model_name is None or key.model_name == model_name) and (
        cache_salt is None or key.cache_salt == cache_salt
    )
