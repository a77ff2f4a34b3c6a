"""The redis adapter: redis-py asyncio (hiredis parser), standalone, unix socket, TLS, Cluster.

Each object is one Redis string under ``key_prefix + wire key``: the unpadded frame header
(``32 + len(wire)`` bytes, so its length follows from the key) followed by the payload. One
``SET`` writes it, so readers see the old value, the new one or nothing. The SET goes out as
the header and a view of the caller's buffer (:class:`_Framed`, packed by a mixin on the
client's connection class), so the adapter never builds a header + payload copy. Reads
verify the header (magic, key, lengths) and the payload checksum; a failure is a miss,
counted in ``corrupt_objects`` and deleted only if the stored value is still the one that
failed. ``get`` copies the payload out of the reply once (a ``bytes`` slice).

Data we did not write (DESIGN section 14). A key under the prefix is ours only if its value
starts with our magic and its header names the very key its name parses to: a value of
another program, or a deployment under a longer prefix (``prod:`` seen from ``""``, whose
names parse as model ``prod:m``), is *foreign*: a miss for reads (``foreign_objects``),
skipped by scans (never accounted or evicted), reported by ``check`` and removed only by
``check(remove_foreign=True)``. Deletes run a script that checks magic and key in the
server before unlinking, so they never remove a foreign value.

Batches (measured on 2 cores, redis-py 8 + hiredis, Redis 7.0; see
``docs/backends.md``): pipelines of up to 4 MiB of small values run ~1.5x faster
than one command per round trip (256 KiB SETs: 0.98 vs 0.62 GB/s), but deep pipelines of
multi-MiB values are slower than sending them one by one (4 MiB SETs: 16 deep 0.42 vs
1.08 GB/s), so values above ``pipeline_value_limit`` go alone. ``get_many`` uses ``MGET``
in groups of 16 keys (256 KiB: 0.80 vs 0.42 GB/s for single GETs; 4 MiB: on par). In
cluster mode batches go through redis-py's cluster pipeline, which splits them into one
pipeline per node.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Final, TypeVar, cast

import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from flexkv_store.backends.base import (
    Buffer,
    Capabilities,
    L2Adapter,
    ObjectInfo,
    check_key,
    writable_view,
)
from flexkv_store.backends.config import RedisConfig
from flexkv_store.errors import (
    BackendUnavailableError,
    BufferTooSmallError,
    CorruptObjectError,
    StorageError,
)
from flexkv_store.keyformat import ObjectKey, as_bytes_view, decode_header, frame, unframe
from flexkv_store.keyformat._framing import MAGIC, MIN_HEADER_LEN, header_key_length

__all__ = ["RedisAdapter"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Attempts after the first one for connection errors and timeouts. With jittered
#: exponential backoff capped at 0.5 s, a refused connection fails within ~1 s and a hung
#: server within ``(_RETRIES + 1) * socket_timeout`` plus that.
_RETRIES: Final = 2
#: Bytes of small values per pipeline: deeper pipelines stop paying off (and keep more
#: data in flight than the server's client output buffer likes).
_PIPELINE_BYTES: Final = 4 << 20
_PIPELINE_MAX_COMMANDS: Final = 64
#: Keys per MGET / read pipeline.
_READ_GROUP: Final = 16
#: Pipelines (or large single values) of one batch in flight at once. Measured on 2 cores:
#: a second one in flight never helped (256 KiB SETs: 16-deep pipelines one at a time
#: 0.98 GB/s, two 8-deep at once 0.87; 4 MiB GETs: one at a time 0.59, two 0.50), since
#: client and server already share the two cores. Kept as a knob for bigger machines.
_BATCH_CONCURRENCY: Final = 1
#: Bytes of a corrupt value kept to recognise it again in the compare-and-delete script.
_FINGERPRINT_LEN: Final = 4096

# Atomically: nothing if the key is absent, else its length and first ARGV[1]+1 bytes
# (length -1 for a value that is not a string: not ours). One script instead of STRLEN +
# GETRANGE keeps both from one version of the value.
_SIZE_SCRIPT: Final = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return false end
if t ~= 'string' then return {-1, ''} end
return {redis.call('STRLEN', KEYS[1]), redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[1]))}
"""

# Unlink KEYS[1] only if it is ours and names the key ARGV[1] (its wire bytes): a string
# that starts with our magic and whose header's key length and key are ARGV[1]'s. Anything
# else (another program's value, another deployment's object) is left alone: returns 0.
_DELETE_OURS_SCRIPT: Final = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then return 0 end
local wire = ARGV[1]
local h = redis.call('GETRANGE', KEYS[1], 0, 23 + #wire)
if #h < 24 + #wire or string.sub(h, 1, 4) ~= 'FKV1' then return 0 end
local lo, hi = string.byte(h, 7, 8)
if lo + 256 * hi ~= #wire or string.sub(h, 25, 24 + #wire) ~= wire then return 0 end
return redis.call('UNLINK', KEYS[1])
"""

# Delete KEYS[1] only if it still has length ARGV[1] and starts with ARGV[2]: a writer
# that replaced the corrupt value since we read it must not lose its object.
_DROP_SCRIPT: Final = """
local v = redis.call('STRLEN', KEYS[1])
if v ~= tonumber(ARGV[1]) then return 0 end
local fp = ARGV[2]
if #fp > 0 and redis.call('GETRANGE', KEYS[1], 0, #fp - 1) ~= fp then return 0 end
return redis.call('DEL', KEYS[1])
"""

#: Redis's default proto-max-bulk-len (512 MB), kept where CONFIG GET is refused.
_DEFAULT_MAX_BULK: Final = 512 * 1024 * 1024

_GLOB_SPECIAL = re.compile(rb"([*?\[\]\\])")

#: redis-py errors that mean "cannot reach the server" (after its retries).
_UNAVAILABLE: Final = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.ClusterDownError,
    rexc.MasterDownError,
    rexc.TryAgainError,
    OSError,
    asyncio.TimeoutError,
)


#: Keys the store itself keeps under an adapter's prefix (quota/_redis_state.py's hash and
#: quota/_redis_acct.py's accounting): not objects, and not foreign either.
_QUOTA_HASH: Final = b"flexkv-store:quotas"
_ACCOUNTING_KEYS: Final = b"acct:"


class _Foreign(Exception):
    """A value at an object's name that is not ours (no magic, or another key's header)."""


@contextmanager
def _seam(what: str) -> Iterator[None]:
    """The one place redis-py (and socket) exceptions become flexkv-store errors."""
    try:
        yield
    except StorageError:
        raise
    except _UNAVAILABLE as exc:
        raise BackendUnavailableError(f"redis: {what}: {type(exc).__name__}: {exc}") from exc
    except (rexc.RedisError, rexc.RedisClusterException) as exc:
        raise StorageError(f"redis: {what}: {type(exc).__name__}: {exc}") from exc


def _header_len(wire: bytes) -> int:
    return MIN_HEADER_LEN + len(wire)


class _Framed:
    """A framed value for ``SET``: the header and a view of the payload, never joined.

    Only connections whose class went through :func:`_framed_class` can send it: their
    ``pack_command`` writes the RESP bulk string's length, the header and the payload view
    as separate chunks, so the payload is not copied into a header + payload ``bytes`` of
    our own (redis-py's socket write joins the chunks once, as it does for a plain SET).
    """

    __slots__ = ("header", "payload")

    def __init__(self, header: bytes, payload: memoryview) -> None:
        self.header = header
        self.payload = payload


_CRLF: Final = b"\r\n"
#: Values up to this size are joined into one chunk (redis-py's own cut-off).
_JOIN_BELOW: Final = 6000


class _FramedPacking:
    """Connection mixin: ``SET name <_Framed>`` packed without copying the payload."""

    __slots__ = ()

    def pack_command(self, *args: Any) -> list[bytes | memoryview]:
        if len(args) == 3 and type(args[2]) is _Framed:
            name, value = args[1], args[2]
            payload = value.payload
            head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b" % (
                len(name),
                name,
                len(value.header) + payload.nbytes,
                value.header,
            )
            if payload.nbytes < _JOIN_BELOW:
                return [b"".join((head, payload, _CRLF))]
            return [head, payload, _CRLF]
        return super().pack_command(*args)  # type: ignore[misc,no-any-return]


_FRAMED_CLASSES: dict[type[Any], type[Any]] = {}


def _framed_class(cls: type[Any]) -> type[Any]:
    """``cls`` (a redis-py asyncio connection class) with :class:`_FramedPacking` mixed in."""
    if issubclass(cls, _FramedPacking):
        return cls
    sub = _FRAMED_CLASSES.get(cls)
    if sub is None:
        sub = type(f"Framed{cls.__name__}", (_FramedPacking, cls), {"__slots__": ()})
        _FRAMED_CLASSES[cls] = sub
    return sub


def _install_framed_packing(client: aredis.Redis | RedisCluster) -> bool:
    """Make every connection ``client`` opens able to send :class:`_Framed` values.

    Returns False (and the adapter joins header and payload itself) if this redis-py
    does not expose the connection class where we look for it.
    """
    try:
        if isinstance(client, RedisCluster):
            kwargs = client.nodes_manager.connection_kwargs
            kwargs["connection_class"] = _framed_class(kwargs.get("connection_class", Connection))
            nodes = [*client.startup_nodes, *client.nodes_manager.startup_nodes.values()]
            for node in nodes:
                node.connection_class = _framed_class(node.connection_class)
                if node._connections:  # opened before we got here: cannot convert
                    return False
            return True
        pool = client.connection_pool
        pool.connection_class = _framed_class(pool.connection_class)
        return True
    except (AttributeError, TypeError):
        return False


class RedisAdapter(L2Adapter):
    """Objects as framed Redis strings; see the module docstring for the batch strategy.

    Works with a standalone server (TCP or unix socket, optional TLS) and with Redis
    Cluster (``cluster=True``; ``nodes`` are the startup nodes). Connection errors and
    timeouts are retried with jittered backoff, then raise
    :class:`~flexkv_store.errors.BackendUnavailableError`; a restarted server is
    reconnected to on the next call.
    """

    name = "redis"
    capabilities: ClassVar[Capabilities] = Capabilities(
        listing=True, shared_across_processes=True, persistent=True, verifies_checksums=True
    )
    config_class = RedisConfig

    def __init__(self, config: RedisConfig | None = None) -> None:
        self.config = config or RedisConfig()
        self._prefix = self.config.key_prefix.encode("utf-8")
        self._client: aredis.Redis | RedisCluster = self._make_client()
        #: Whether SETs go out as header + payload view (no copy of ours); see _Framed.
        self._zero_copy = _install_framed_packing(self._client)
        self._closed = False
        self._server_version: str | None = None
        self._max_bulk = _DEFAULT_MAX_BULK
        #: Objects that failed their header or checksum check (each was a miss).
        self.corrupt_objects = 0
        #: Values at an object's name that are not ours (each was a miss, left alone).
        self.foreign_objects = 0

    # -- client set-up -----------------------------------------------------------------

    def _make_client(self) -> aredis.Redis | RedisCluster:
        cfg = self.config
        common: dict[str, Any] = {
            "username": cfg.username,
            "password": cfg.password.get_secret_value() if cfg.password else None,
            "socket_timeout": cfg.socket_timeout,
            "socket_connect_timeout": cfg.socket_timeout,
            "retry": Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), _RETRIES),
            "decode_responses": False,
        }
        if cfg.tls:
            common.update(
                ssl=True,
                ssl_ca_certs=cfg.tls_ca_certs,
                ssl_certfile=cfg.tls_certfile,
                ssl_keyfile=cfg.tls_keyfile,
                ssl_cert_reqs="required" if cfg.tls_verify else "none",
                ssl_check_hostname=cfg.tls_verify,
            )
        if cfg.cluster:
            common["max_connections"] = cfg.max_connections
            if cfg.url:
                return RedisCluster.from_url(cfg.url, **common)
            seeds = cfg.nodes or [f"{cfg.host}:{cfg.port}"]
            nodes = []
            for seed in seeds:
                host, _, port = seed.rpartition(":")
                nodes.append(ClusterNode(host.strip("[]") or "127.0.0.1", int(port)))
            return RedisCluster(startup_nodes=nodes, **common)
        common["max_connections"] = cfg.max_connections
        if cfg.url:
            return aredis.Redis.from_url(cfg.url, **common)
        if cfg.unix_socket:
            # TLS and host/port do not apply to a unix socket.
            for k in ("ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
                common.pop(k, None)
            common.pop("ssl_check_hostname", None)
            return aredis.Redis(unix_socket_path=cfg.unix_socket, db=cfg.db, **common)
        return aredis.Redis(host=cfg.host, port=cfg.port, db=cfg.db, **common)

    @property
    def client(self) -> aredis.Redis | RedisCluster:
        """The redis-py client (for tests and tools; not part of the adapter contract)."""
        return self._client

    def _name(self, key: ObjectKey) -> tuple[bytes, bytes]:
        """The Redis key of ``key`` and its wire bytes (whose length fixes the header's)."""
        wire = check_key(key).to_wire().encode("utf-8")
        return self._prefix + wire, wire

    def redis_key(self, key: ObjectKey) -> bytes:
        """The Redis key an object is stored under: ``key_prefix + wire string``."""
        return self._name(key)[0]

    async def _probe(self) -> None:
        # Remembered for info(); one INFO per adapter, on first use.
        if self._server_version is None:
            server = await self._client.info("server")
            if isinstance(server, dict) and "redis_version" not in server:
                # A cluster answers per node: {node_name: {...}}.
                server = next(iter(server.values()), {})
            self._server_version = str(server.get("redis_version", "unknown"))
            self._max_bulk = await self._proto_max_bulk_len()

    async def _proto_max_bulk_len(self) -> int:
        """The server's largest accepted value (``proto-max-bulk-len``).

        A larger SET makes the server drop the connection, which would look like an
        outage and be retried; knowing the limit turns it into a clear error up front.
        Servers that refuse CONFIG (managed services) keep Redis's default, 512 MB.
        """
        try:
            reply: Any = await self._client.config_get("proto-max-bulk-len")
        except (rexc.ResponseError, rexc.RedisClusterException):
            return _DEFAULT_MAX_BULK
        if isinstance(reply, dict) and "proto-max-bulk-len" not in reply:
            reply = next(iter(reply.values()), {})  # per node, in a cluster
        try:
            return int(reply.get("proto-max-bulk-len", _DEFAULT_MAX_BULK))
        except (TypeError, ValueError, AttributeError):
            return _DEFAULT_MAX_BULK

    def _check_bulk(self, key: ObjectKey, payload_len: int) -> None:
        total = payload_len + _header_len(key.to_wire().encode("utf-8"))
        if total > self._max_bulk:
            raise StorageError(
                f"redis: put {key.to_wire()}: the value ({total} bytes with its header) is "
                f"larger than the server's proto-max-bulk-len ({self._max_bulk} bytes)"
            )

    # -- decoding and corruption -------------------------------------------------------

    def _decode(self, key: ObjectKey, raw: bytes) -> memoryview:
        if raw[: len(MAGIC)] != MAGIC:
            raise _Foreign("it does not start with our magic")
        # Whose it is comes first: another deployment's object is foreign even when its
        # payload is damaged (so never dropped as "corrupt").
        header = decode_header(raw)
        if header.key != key:
            raise _Foreign(f"its header names another key ({header.key.to_wire()!r})")
        _, payload = unframe(raw)
        return payload

    def _foreign(self, name: bytes, why: object) -> None:
        self.foreign_objects += 1
        log.debug("redis: %r is not ours (%s); a miss, left alone", name, why)

    async def _corrupt(self, name: bytes, raw: bytes, exc: CorruptObjectError) -> None:
        """Count and log a corrupt value, and delete it if it is still the same value."""
        self.corrupt_objects += 1
        log.warning("redis: corrupt object %r treated as a miss: %s", name, exc)
        if not self.delete_corrupt:
            return
        try:
            with _seam("delete corrupt object"):
                await self._client.eval(  # type: ignore[misc]
                    _DROP_SCRIPT, 1, name, len(raw), raw[:_FINGERPRINT_LEN]
                )
        except StorageError as drop_exc:
            # The read itself succeeded (as a miss); failing to clean up must not fail it.
            log.warning("redis: could not delete corrupt object %r: %s", name, drop_exc)

    async def _verified(self, key: ObjectKey, name: bytes, raw: bytes | None) -> memoryview | None:
        if raw is None:
            return None
        try:
            return self._decode(key, raw)
        except _Foreign as exc:
            self._foreign(name, exc)
            return None
        except CorruptObjectError as exc:
            await self._corrupt(name, raw, exc)
            return None

    async def _payload(self, key: ObjectKey, name: bytes, raw: bytes | None) -> bytes | None:
        """The verified payload of ``raw`` as its own ``bytes`` (one copy), or None."""
        payload = await self._verified(key, name, raw)
        if payload is None or raw is None:
            return None
        if type(raw) is bytes:
            # Slicing bytes measured faster than bytes(memoryview) (2-5x at 256 KiB).
            return raw[len(raw) - payload.nbytes :]
        return bytes(payload)

    # -- single operations -------------------------------------------------------------

    async def put(self, key: ObjectKey, data: Buffer) -> None:
        # docstring inherited
        name, _ = self._name(key)
        view = as_bytes_view(data)
        with _seam("put"):
            if self._server_version is None:
                await self._probe()
            self._check_bulk(key, view.nbytes)
            try:
                await self._set(name, self._framed(key, view))
            except rexc.DataError:
                if not self._drop_zero_copy():
                    raise
                await self._set(name, self._framed(key, view))

    def _drop_zero_copy(self) -> bool:
        """After a connection refused a _Framed value: join values from now on.

        redis-py packs a command before sending any of it, so the refused command (or
        pipeline) can simply be sent again. Returns whether _Framed was in use.
        """
        if not self._zero_copy:
            return False
        self._zero_copy = False
        log.warning("redis: a connection cannot send header + payload views; joining them")
        return True

    async def _set(self, name: bytes, value: _Framed | bytes) -> None:
        # redis-py's stubs do not know _Framed (our connections' pack_command does).
        set_command: Callable[..., Awaitable[Any]] = self._client.execute_command
        await set_command("SET", name, value)

    def _framed(self, key: ObjectKey, data: Buffer) -> _Framed | bytes:
        # One SET of header + payload: atomic without a transaction, and measured faster
        # than MULTI + SET header + APPEND payload. The two parts go to the socket as
        # separate chunks (no header + payload copy of ours) where _Framed is installed.
        header, payload = frame(key, data)
        if self._zero_copy:
            return _Framed(header, payload)
        return header + payload

    async def get(self, key: ObjectKey) -> bytes | None:
        # docstring inherited
        name, _ = self._name(key)
        with _seam("get"):
            if self._server_version is None:
                await self._probe()
            raw = await self._get(name)
        return await self._payload(key, name, raw)

    async def _get(self, name: bytes) -> bytes | None:
        """GET, with a value that is not a string (not ours) read as a miss."""
        try:
            return cast("bytes | None", await self._client.get(name))
        except rexc.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            self._foreign(name, "not a string")
            return None

    async def get_into(self, key: ObjectKey, out: Buffer) -> int | None:
        # docstring inherited
        name, _ = self._name(key)
        view = writable_view(out)
        with _seam("get_into"):
            if self._server_version is None:
                await self._probe()
            raw = await self._get(name)
        payload = await self._verified(key, name, raw)
        if payload is None:
            return None
        n = payload.nbytes
        if n > view.nbytes:
            raise BufferTooSmallError(n, view.nbytes)
        view[:n] = payload
        return n

    async def size(self, key: ObjectKey) -> int | None:
        # docstring inherited
        name, wire = self._name(key)
        with _seam("size"):
            if self._server_version is None:
                await self._probe()
            reply = await self._client.eval(  # type: ignore[misc]
                _SIZE_SCRIPT, 1, name, _header_len(wire) - 1
            )
        return await self._size_from(key, name, wire, reply)

    async def _size_from(self, key: ObjectKey, name: bytes, wire: bytes, reply: Any) -> int | None:
        """Payload size from the size script's reply, checking the header without the payload."""
        if reply is None:
            return None
        total, head = int(reply[0]), bytes(reply[1])
        if total < 0 or header_key_length(head) != len(wire):
            # not ours, or a header naming a key of another length (e.g. a deployment
            # under a shorter prefix, whose key is longer than the one we parsed)
            self._foreign(name, "not an object of ours under this name")
            return None
        try:
            header = decode_header(head)
            if header.key != key or header.header_len != _header_len(wire):
                self._foreign(name, "its header names another key")
                return None
            if header.payload_len != total - header.header_len:
                raise CorruptObjectError(
                    f"stored length {total - header.header_len} does not match the header's "
                    f"{header.payload_len}"
                )
        except CorruptObjectError as exc:
            # ``head`` is a prefix of the value: enough to recognise it for the delete.
            self.corrupt_objects += 1
            log.warning("redis: corrupt object %r treated as a miss: %s", name, exc)
            if self.delete_corrupt:
                with _seam("delete corrupt object"):
                    await self._client.eval(  # type: ignore[misc]
                        _DROP_SCRIPT, 1, name, total, head
                    )
            return None
        return header.payload_len

    async def exists(self, key: ObjectKey) -> bool:
        # docstring inherited
        return await self.size(key) is not None

    async def delete(self, key: ObjectKey) -> bool:
        # docstring inherited
        name, wire = self._name(key)
        with _seam("delete"):
            if self._server_version is None:
                await self._probe()
            # UNLINK (in the script) frees large values in a background thread.
            return bool(
                await self._client.eval(_DELETE_OURS_SCRIPT, 1, name, wire)  # type: ignore[misc]
            )

    # -- batches -----------------------------------------------------------------------

    async def _bounded(self, jobs: Sequence[Callable[[], Awaitable[_T]]]) -> list[_T]:
        """Run ``jobs`` with at most _BATCH_CONCURRENCY in flight; all finish, first error wins."""
        if len(jobs) == 1:
            return [await jobs[0]()]
        sem = asyncio.Semaphore(_BATCH_CONCURRENCY)

        async def one(job: Callable[[], Awaitable[_T]]) -> _T:
            async with sem:
                return await job()

        results = await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return cast("list[_T]", results)

    def _pipeline(self) -> Any:
        # A plain (non-transactional) pipeline: in cluster mode redis-py splits it per node.
        return self._client.pipeline(transaction=False)

    async def put_each(self, items: Iterable[tuple[ObjectKey, Buffer]]) -> list[Exception | None]:
        # docstring inherited
        # Check every key and buffer before anything is written, but frame (copy) each
        # group only when it is sent: framing a whole batch up front touches twice the
        # memory and measured ~25% slower for 64 MiB batches of 256 KiB values.
        pending = [(self._name(k)[0], k, as_bytes_view(d)) for k, d in items]
        if not pending:
            return []
        groups: list[list[tuple[bytes, ObjectKey, memoryview]]] = []
        group: list[tuple[bytes, ObjectKey, memoryview]] = []
        group_bytes = 0
        for item in pending:
            n = item[2].nbytes
            if n > self.config.pipeline_value_limit:
                groups.append([item])  # large values go alone
                continue
            if group and (
                group_bytes + n > _PIPELINE_BYTES or len(group) >= _PIPELINE_MAX_COMMANDS
            ):
                groups.append(group)
                group, group_bytes = [], 0
            group.append(item)
            group_bytes += n
        if group:
            groups.append(group)

        async def send_once(g: list[tuple[bytes, ObjectKey, memoryview]]) -> None:
            if len(g) == 1:
                name, key, view = g[0]
                await self._set(name, self._framed(key, view))
                return
            pipe = self._pipeline()
            for name, key, view in g:
                pipe.execute_command("SET", name, self._framed(key, view))
            await pipe.execute()

        async def send(g: list[tuple[bytes, ObjectKey, memoryview]]) -> list[Exception | None]:
            # One outcome per group: a failed pipeline may have applied some of its SETs.
            # (In a list: _bounded raises results that are exceptions.)
            try:
                with _seam("put_many"):
                    for _, key, view in g:
                        self._check_bulk(key, view.nbytes)
                    try:
                        await send_once(g)
                    except rexc.DataError:
                        if not self._drop_zero_copy():
                            raise
                        await send_once(g)
            except StorageError as exc:
                return [exc]
            return [None]

        with _seam("put_many"):
            if self._server_version is None:
                await self._probe()
        outcomes = await self._bounded([lambda g=g: send(g) for g in groups])  # type: ignore[misc]
        by_name: dict[bytes, Exception | None] = {}
        for g, outcome in zip(groups, outcomes, strict=True):
            for name, _, _ in g:
                by_name[name] = outcome[0]
        return [by_name[name] for name, _, _ in pending]

    async def get_many(self, keys: Sequence[ObjectKey]) -> list[bytes | None]:
        # docstring inherited
        names = [self._name(k)[0] for k in keys]
        if not names:
            return []
        cluster = isinstance(self._client, RedisCluster)

        async def fetch(start: int) -> list[bytes | None]:
            chunk = names[start : start + _READ_GROUP]
            raws: list[bytes | None]
            if len(chunk) == 1:
                raws = [await self._get(chunk[0])]
            elif not cluster:
                # MGET answers nil for a value that is not a string (not ours).
                raws = cast("list[bytes | None]", list(await self._client.mget(chunk)))  # type: ignore[misc]
            else:
                pipe = self._pipeline()
                for n in chunk:
                    pipe.get(n)
                raws = []
                for n, r in zip(chunk, await pipe.execute(raise_on_error=False), strict=True):
                    if isinstance(r, rexc.ResponseError) and str(r).startswith("WRONGTYPE"):
                        self._foreign(n, "not a string")
                        r = None
                    elif isinstance(r, Exception):
                        raise r
                    raws.append(r)
            # Verify and copy each group's payloads as it arrives, dropping each reply
            # once copied: the allocator reuses its memory for the next group instead of
            # the whole batch's replies and payloads being alive at once (page faults).
            out: list[bytes | None] = []
            for i, name in enumerate(chunk):
                raw, raws[i] = raws[i], None
                out.append(await self._payload(keys[start + i], name, raw))
            return out

        with _seam("get_many"):
            if self._server_version is None:
                await self._probe()
            parts = await self._bounded(
                [lambda s=s: fetch(s) for s in range(0, len(names), _READ_GROUP)]  # type: ignore[misc]
            )
        return [p for part in parts for p in part]

    async def _size_many(self, keys: Sequence[ObjectKey]) -> list[int | None]:
        named = [(k, *self._name(k)) for k in keys]
        if not named:
            return []
        with _seam("exists_many"):
            if self._server_version is None:
                await self._probe()
            pipe = self._pipeline()
            for _, name, wire in named:
                pipe.eval(_SIZE_SCRIPT, 1, name, _header_len(wire) - 1)
            replies = await pipe.execute()
        return [
            await self._size_from(k, name, wire, reply)
            for (k, name, wire), reply in zip(named, replies, strict=True)
        ]

    async def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        # docstring inherited
        return [s is not None for s in await self._size_many(keys)]

    async def delete_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        # docstring inherited
        named = [self._name(k) for k in keys]
        if not named:
            return []
        with _seam("delete_many"):
            if self._server_version is None:
                await self._probe()
            pipe = self._pipeline()
            for name, wire in named:
                pipe.eval(_DELETE_OURS_SCRIPT, 1, name, wire)
            return [bool(r) for r in await pipe.execute()]

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
                if not self._is_store_state(name):
                    yield name.decode("utf-8", "surrogateescape")

    def _is_store_state(self, name: bytes) -> bool:
        """The store's own keys under the prefix: the quota hash and the shared accounting."""
        rest = name[len(self._prefix) :]
        return rest == _QUOTA_HASH or rest.startswith(_ACCOUNTING_KEYS)

    async def remove_foreign(self, name: str) -> bool:
        # docstring inherited
        raw = name.encode("utf-8", "surrogateescape")
        if not raw.startswith(self._prefix) or self._is_store_state(raw):
            return False  # never outside our prefix, never the store's own state
        with _seam("remove foreign"):
            return bool(await self._client.unlink(raw))

    async def _scan_pages(
        self, model_name: str | None, cache_salt: str | None
    ) -> AsyncIterator[tuple[list[ObjectInfo], list[bytes]]]:
        """``(our objects, foreign names)`` for each SCAN page of the names under the prefix."""
        pattern = _GLOB_SPECIAL.sub(rb"\\\1", self._prefix) + b"*"
        with _seam("scan"):
            if self._server_version is None:
                await self._probe()
            if isinstance(self._client, RedisCluster):
                clients: list[Any] = list(self._client.get_primaries())
            else:
                clients = [self._client]
        for node in clients:
            cursor = 0
            while True:
                with _seam("scan"):
                    cursor, names = await self._scan_page(node, cursor, pattern)
                keys: list[tuple[ObjectKey, bytes]] = []
                foreign: list[bytes] = []
                for name in map(bytes, names):
                    key = self._parse(name)
                    if key is None:
                        foreign.append(name)
                    elif (model_name is None or key.model_name == model_name) and (
                        cache_salt is None or key.cache_salt == cache_salt
                    ):
                        keys.append((key, name))
                yield await self._classify(keys, foreign)
                if cursor == 0:
                    break

    async def _scan_page(self, node: Any, cursor: int, pattern: bytes) -> tuple[int, list[Any]]:
        if isinstance(node, ClusterNode):
            reply = await node.execute_command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            return int(reply[0]), list(reply[1])
        cur, names = await self._client.scan(cursor, match=pattern, count=1000)  # type: ignore[misc]
        return int(cur), list(names)

    def _parse(self, name: bytes) -> ObjectKey | None:
        """The key a Redis key name stands for, or None for names that are no key's."""
        if not name.startswith(self._prefix):
            return None
        try:
            return ObjectKey.from_wire(name[len(self._prefix) :].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None

    async def _classify(
        self, keys: list[tuple[ObjectKey, bytes]], foreign: list[bytes]
    ) -> tuple[list[ObjectInfo], list[bytes]]:
        """Which of a scan page's well-named keys are ours, from their headers (one pipeline).

        Ours: a string starting with our magic whose header names the key its name parses
        to (a header of ours that no longer decodes is a corrupt object of ours: listed,
        so that reads and ``check`` deal with it). Everything else joins ``foreign``.
        """
        if not keys:
            return [], foreign
        with _seam("scan"):
            pipe = self._pipeline()
            for _, name in keys:
                pipe.eval(_SIZE_SCRIPT, 1, name, _header_len(name[len(self._prefix) :]) - 1)
                pipe.object("idletime", name)
            replies = await pipe.execute(raise_on_error=False)
        now = time.time()
        infos = []
        for i, (key, name) in enumerate(keys):
            reply, idle = replies[2 * i], replies[2 * i + 1]
            if reply is None:
                continue  # deleted since SCAN saw it
            if isinstance(reply, Exception):
                raise StorageError(f"redis: scan: {reply}")
            total, head = int(reply[0]), bytes(reply[1])
            wire = name[len(self._prefix) :]
            header_len = _header_len(wire)
            if total < header_len or header_key_length(head) != len(wire):
                foreign.append(name)  # not ours, or another key's header (other length)
                continue
            try:
                header = decode_header(head)
            except CorruptObjectError:
                size = total - header_len  # ours, torn: a read finds it corrupt
            else:
                if header.key != key:
                    foreign.append(name)  # e.g. a deployment under a longer prefix
                    continue
                size = header.payload_len
            # Redis keeps no mtime; idle time (seconds since last access) is the closest
            # fact it has, and what LRU rebuilding needs. Under an LFU maxmemory policy
            # OBJECT IDLETIME is refused: report "now".
            age = 0 if isinstance(idle, Exception) or idle is None else int(idle)
            infos.append(ObjectInfo(key, size, now - age))
        return infos, foreign

    # -- lifecycle ---------------------------------------------------------------------

    async def aclose(self) -> None:
        # docstring inherited
        if self._closed:
            return
        self._closed = True
        with _seam("close"):
            await self._client.aclose()

    def info(self) -> dict[str, Any]:
        # docstring inherited
        cfg = self.config
        if cfg.cluster:
            mode, where = "cluster", ",".join(cfg.nodes) or f"{cfg.host}:{cfg.port}"
        elif cfg.unix_socket:
            mode, where = "unix", cfg.unix_socket
        else:
            mode, where = "standalone", f"{cfg.host}:{cfg.port}/{cfg.db}"
        if cfg.url:
            where = _strip_userinfo(cfg.url)
        return {
            "adapter": self.name,
            "mode": mode,
            "server": where,
            "tls": cfg.tls,
            "server_version": self._server_version,
            "key_prefix": cfg.key_prefix,
            "pipeline_value_limit": cfg.pipeline_value_limit,
            "corrupt_objects": self.corrupt_objects,
        }


def _strip_userinfo(url: str) -> str:
    """A URL without ``user:password@`` (info() never shows secrets)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host = rest.split("/", 1)
    host[0] = host[0].rsplit("@", 1)[-1]
    return f"{scheme}://{'/'.join(host)}"
