"""flexkv-store as a storage tier of vLLM's native KV offloading (vLLM 0.33).

vLLM's ``OffloadingConnector`` with ``TieringOffloadingSpec`` keeps a CPU tier (a pinned
shared-memory region, one row per chunk holding every tensor-parallel rank's bytes) and
cascades rows to *secondary tiers* loaded by class name and module path. This module
gives it one, and a connector that tells it each request's tenant::

    vllm serve MODEL --block-size 16 --kv-transfer-config '{
      "kv_connector": "FlexKVStoreConnector",
      "kv_connector_module_path": "flexkv_store.integrations.vllm",
      "kv_role": "kv_both",
      "kv_connector_extra_config": {
        "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 8000000000,
        "block_size": 256,
        "secondary_tiers": [{"type": "FlexKVStoreTier",
                             "module_path": "flexkv_store.integrations.vllm",
                             "config": "/etc/flexkv.yaml"}]}}'

:class:`FlexKVStoreTier` runs a :class:`~flexkv_store.store.Store` on an event loop of
its own thread: every method vLLM calls returns at once and reports through
``get_finished_jobs`` (vLLM polls). Stores write rows of the primary view in place and
loads read into them with ``get_into``; lookups answer from the store's accounting, or
``RETRY`` while a batched existence check runs. A backend that is down gives misses and
failed stores, logged and counted, never an exception into vLLM.

Keys: vLLM's ``OffloadKey`` is ``block_hash + group_idx (4 bytes)``, the hash of the
chunk's last engine block; ours is ``ObjectKey(model, kv_rank, block_hash, cache_salt)``
with ``kv_rank`` a digest of the row layout (see :func:`layout_descriptor`), so a row
written under one layout (TP size, dtype, block and chunk size, layers, group) is never
loaded under another. :func:`flexkv_store.keyformat.chunk_keys` with
``block_size=16`` computes the same chunk hashes outside vLLM.

docs/vllm.md has the tier keys, tenants and limits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Collection, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
    get_offload_block_hash,
    get_offload_group_idx,
    make_offload_key,
)
from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector
from vllm.v1.kv_offload.tiering.base import JobId, JobResult, SecondaryTierManager, TransferJob

from flexkv_store._logs import Throttle
from flexkv_store.config import _merge, is_loopback_host, load_config, read_config_file
from flexkv_store.errors import (
    ConcurrentWriteError,
    ConfigError,
    InvalidKeyError,
    QuotaExceededError,
)
from flexkv_store.keyformat import ObjectKey, check_cache_salt
from flexkv_store.store import Store, open_store

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.request import Request

__all__ = ["FlexKVStoreConnector", "FlexKVStoreTier", "layout_descriptor"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Version of the layout descriptor; bump when its fields change meaning.
LAYOUT_VERSION = 1


def layout_descriptor(spec: OffloadingSpec, group_id: int, row_bytes: int) -> dict[str, Any]:
    """What identifies the bytes of one row of ``group_id``, besides the chunk's hash.

    Everything that changes the row's bytes for the same tokens: model and KV dtype, the
    parallel layout (a row holds every rank's pages), block and chunk sizes, the group's
    layers, the CPU layout options and the row size. The engine id and the data-parallel
    rank are not in it, so replicas of one deployment share objects.
    """
    cfg = spec.config
    group = next((g for g in cfg.groups if g.group_id == group_id), None)
    if group is None:
        raise ValueError(f"group {group_id} is not offloaded by this spec")
    p = cfg.parallel
    return {
        "v": LAYOUT_VERSION,
        "engine": "vllm",
        "dtype": cfg.model.dtype,
        "tokens_per_hash": cfg.cache.tokens_per_hash,
        "blocks_per_chunk": cfg.cache.blocks_per_chunk,
        "worker_kv_bytes_per_block": cfg.worker_kv_bytes_per_block,
        "world_size": p.world_size,
        "tp_size": p.tp_size,
        "pp_size": p.pp_size,
        "pcp_size": p.pcp_size,
        "dcp_size": p.dcp_size,
        "replicated_layout": bool(cfg.replicated_layout),
        "canonical_layout": bool(cfg.canonical_layout),
        "kv_cache_layout": cfg.kv_cache_layout,
        "group_id": group.group_id,
        "tokens_per_block": group.tokens_per_block,
        "layer_names": list(group.layer_names),
        "row_bytes": row_bytes,
    }


def _layout_rank(desc: Mapping[str, Any]) -> int:
    """The 32-bit ``kv_rank`` naming a layout: the first 4 bytes of its sha256."""
    canonical = json.dumps(desc, sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(canonical).digest()[:4], "big")


@dataclass(slots=True)
class _Tenant:
    """Per-request state: the salt it accounts to, or why it has none."""

    salt: str | None
    error: str | None = None


@dataclass(slots=True)
class _Probe:
    """An existence check of one key: pending (``result`` None) or answered."""

    gen: int
    result: bool | None = None
    requests: set[str] = field(default_factory=set)
    in_flight: bool = False


class FlexKVStoreTier(SecondaryTierManager):
    """A vLLM secondary tier backed by a flexkv-store :class:`Store`.

    Built by vLLM's ``SecondaryTierFactory`` from a tier entry; its keys besides ``type``
    and ``module_path`` arrive here:

    * ``config``: a flexkv-store config file path or dict; or ``backend``: a backend URL
      (``"fs:///var/cache/kv"``, ``"redis://host:6379/0"``). Any other store config key
      (``quota``, ``l1``, ``backends``, ``admin``, ``metrics``) is merged over it.
    * ``model_name``: the model part of our keys (default: vLLM's model name).
    * ``check_misses`` (default true): a key the accounting does not know is checked on
      the backends (``RETRY`` for one step) before it is a miss, so chunks that other
      replicas wrote are found; false answers from the accounting alone.
    * ``kv_events`` (default true): emit STORAGE events (effective when vLLM's KV events
      are on); ``locality``: ``"LOCAL"`` or ``"REMOTE"`` in those events.
    * ``serve_admin`` (default false): serve the admin API (quotas, usage, ``/metrics``)
      from the ``admin`` section (host, port, token) on the tier's loop.
    * ``shutdown_timeout_s`` (default 30): the longest ``shutdown`` waits for I/O.
    """

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: BackpressureDetector | None = None,
        *,
        config: str | Mapping[str, Any] | None = None,
        backend: str | None = None,
        model_name: str | None = None,
        check_misses: bool = True,
        kv_events: bool = True,
        locality: str | None = None,
        serve_admin: bool = False,
        shutdown_timeout_s: float = 30.0,
        **store_keys: Any,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality.upper()) if locality is not None else None
        self._check_misses = bool(check_misses)
        self._shutdown_timeout = float(shutdown_timeout_s)
        # Config first: a bad entry raises before anything holds the shared region.
        self._store_config = load_config(_tier_config(config, backend, store_keys))
        self.store: Store = open_store(self._store_config)
        view_shape = tuple(primary_kv_view.shape or ())
        if len(view_shape) != 2 or primary_kv_view.itemsize != 1:
            raise ConfigError(
                f"primary_kv_view: expected (num_chunks, row_bytes) of bytes, got shape "
                f"{view_shape} of {primary_kv_view.itemsize}-byte items"
            )
        # The whole row: its stride is page-aligned, so O_DIRECT writes need no bounce.
        self._row_bytes = int(view_shape[1])
        cfg = offloading_spec.config
        self.model_name = model_name if model_name is not None else cfg.model.name
        self._rank_of: dict[int, int] = {}  # group_idx -> kv_rank
        self.layouts: dict[int, dict[str, Any]] = {}
        for group in cfg.groups:
            desc = layout_descriptor(offloading_spec, group.group_id, self._row_bytes)
            self.layouts[group.group_id] = desc
            self._rank_of[group.group_id] = _layout_rank(desc)
        self._group_of = {rank: g for g, rank in self._rank_of.items()}
        try:
            for rank in self._rank_of.values():
                ObjectKey(self.model_name, rank, b"\x00")
        except InvalidKeyError as exc:
            raise ConfigError(f"model_name {self.model_name!r}: {exc}") from None

        # Released at shutdown: vLLM releases the view after its tiers shut down, and an
        # array still exporting it would keep the shared region mapped.
        self._rows: np.ndarray[Any, np.dtype[np.uint8]] = np.asarray(primary_kv_view).view(np.uint8)
        self._events_on = bool(kv_events) and bool(
            offloading_spec.kv_events_config.enable_kv_cache_events
        )
        self._events: deque[OffloadingEvent] = deque()
        self._finished: deque[JobResult] = deque()
        self._failed_loads: deque[list[ObjectKey]] = deque()
        self._inflight: dict[JobId, concurrent.futures.Future[None]] = {}
        self._inflight_lock = threading.Lock()
        self._expected_salts: dict[str, Any] = {}
        self._salts_lock = threading.Lock()
        # Existence checks (scheduler side: only touched under vLLM's manager lock).
        self._probes: dict[ObjectKey, _Probe] = {}
        self._probe_batch: list[tuple[ObjectKey, int]] = []
        self._probe_results: deque[list[tuple[ObjectKey, int, bool]]] = deque()
        self._probe_gen = 0
        self._probes_in_flight = 0
        self._unloadable: dict[ObjectKey, None] = {}  # recent failed loads, oldest first
        self._throttle = Throttle(log)
        self._closed = False
        self._admin: Any = None
        self._admin_task: asyncio.Task[None] | None = None

        admin_socket = self._bind_admin() if serve_admin else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"flexkv-store-{tier_type}", daemon=True
        )
        self._thread.start()
        self._on_loop(self._open(admin_socket))
        log.info(
            "flexkv-store tier for %s: rows of %d bytes, layout kv_rank(s) %s, backends %s",
            self.model_name,
            self._row_bytes,
            ", ".join(f"{r:08x}" for r in self._rank_of.values()),
            ", ".join(a.type for a in self._store_config.adapters),
        )

    # -- store loop ------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            self._loop.run_forever()
        except BaseException as exc:
            log.error("flexkv-store tier: the store's event loop died: %r", exc)
        finally:
            self._fail_orphans()

    def _fail_orphans(self) -> None:
        """The loop thread is gone: every job still in flight is reported failed, so vLLM
        releases its rows instead of waiting for ever. Called on that thread's way out."""
        with self._inflight_lock:
            orphans = list(self._inflight)
            self._inflight.clear()
        for job_id in orphans:
            self._finished.append(JobResult(job_id=job_id, success=False))

    def _on_loop(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _open(self, admin_socket: socket.socket | None) -> None:
        self.store.add_listener(self._store_event)
        if admin_socket is not None:
            await self._start_admin(admin_socket)
        try:
            await self.store.open()
        except Exception as exc:  # a backend down at start: calls retry the open
            self._throttle.warn("open", "flexkv-store tier: opening the store failed: %s", exc)

    def _bind_admin(self) -> socket.socket:
        """Check the admin API can be served (at startup, where vLLM shows the error) and
        bind its socket; ``serve`` then only accepts on it."""
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"serve_admin needs the server extra ({exc.name} missing): "
                "pip install 'flexkv-store[server]'"
            ) from None
        admin = self._store_config.admin
        if not is_loopback_host(admin.host) and admin.token is None:
            raise ConfigError(
                f"serve_admin: refusing to serve the admin API on non-loopback address "
                f"{admin.host!r} without a token (admin.token or FLEXKV_STORE_ADMIN_TOKEN)"
            )
        try:
            infos = socket.getaddrinfo(admin.host, admin.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as exc:
            raise ConfigError(
                f"serve_admin: cannot listen on {admin.host}:{admin.port}: {exc.strerror or exc} "
                "(with several engines, give each its own admin.port)"
            ) from None
        sock.setblocking(False)
        return sock

    async def _start_admin(self, sock: socket.socket) -> None:
        import uvicorn

        from flexkv_store.quota.api import create_app

        admin = self._store_config.admin
        token = admin.token.get_secret_value() if admin.token else None
        app = create_app(
            self.store,
            token=token,
            title="flexkv-store (vLLM tier)",
            local_requests_need_token=admin.local_requests_need_token,
        )
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._admin = server

        async def serve() -> None:
            try:
                await server.serve(sockets=[sock])
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # uvicorn exits the process on some errors
                log.error("flexkv-store tier: the admin API stopped: %r", exc)
            finally:
                sock.close()

        self._admin_task = asyncio.get_running_loop().create_task(serve())
        host, port = sock.getsockname()[:2]
        log.info("flexkv-store tier: admin API on http://%s:%d", host, port)

    def _store_event(self, event: str, keys: list[ObjectKey]) -> None:
        """Store listener (on the loop): objects that left storage become removal events."""
        if not self._events_on:
            return
        ours = [o for o in (self._offload_key(k) for k in keys) if o is not None]
        if ours:
            self._events.append(
                OffloadingEvent(
                    keys=ours,
                    medium=Medium.STORAGE,
                    removed=True,
                    locality=self.locality,
                )
            )

    # -- keys and tenants ------------------------------------------------------------

    def _object_key(self, key: OffloadKey, salt: str) -> ObjectKey | None:
        rank = self._rank_of.get(get_offload_group_idx(key))
        if rank is None:
            return None
        return ObjectKey(self.model_name, rank, get_offload_block_hash(key), salt)

    def _offload_key(self, key: ObjectKey) -> OffloadKey | None:
        if key.model_name != self.model_name:
            return None
        group = self._group_of.get(key.kv_rank)
        return None if group is None else make_offload_key(key.chunk_hash, group)

    def expect_request(self, req_id: str, cache_salt: Any) -> None:
        """The tenant of a request vLLM is about to announce (:class:`FlexKVStoreConnector`
        calls this; thread-safe)."""
        with self._salts_lock:
            self._expected_salts[req_id] = cache_salt

    def _tenant(self, req_context: ReqContext) -> _Tenant:
        tenant = req_context.get_state(_Tenant)
        if tenant is None:  # a request vLLM announced before this tier saw it
            tenant = self._resolve_tenant(req_context)
            req_context.set_state(tenant)
        return tenant

    def _resolve_tenant(self, req_context: ReqContext) -> _Tenant:
        with self._salts_lock:
            raw: Any = self._expected_salts.pop(req_context.req_id, None)
        if raw is None and req_context.kv_transfer_params:
            raw = req_context.kv_transfer_params.get("cache_salt")
        if raw is None or raw == "":
            return _Tenant("")
        if not isinstance(raw, str):
            return _Tenant(None, f"cache_salt must be a string (got {type(raw).__name__})")
        try:
            return _Tenant(check_cache_salt(raw))
        except InvalidKeyError as exc:
            return _Tenant(None, str(exc))

    # -- vLLM's calls (scheduler thread, under the manager's lock) -------------------

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        tenant = self._resolve_tenant(req_context)
        req_context.set_state(tenant)
        if tenant.error is not None:
            self._throttle.warn(
                "salt",
                "flexkv-store tier: request %s is not offloaded: %s",
                req_context.req_id,
                tenant.error,
            )
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        tenant = self._tenant(req_context)
        if tenant.salt is None or self._closed:
            return LookupResult.MISS
        okey = self._object_key(key, tenant.salt)
        if okey is None:
            return LookupResult.MISS
        self._drain_probe_results()
        probe = self._probes.get(okey)
        if probe is not None and (probe.result is None or req_context.req_id in probe.requests):
            probe.requests.add(req_context.req_id)
            if probe.result is None:
                return LookupResult.RETRY
            return LookupResult.HIT if probe.result else LookupResult.MISS
        # (an answer given to earlier requests is not reused by a new one: it may be stale)
        if okey not in self._unloadable and self.store.accounting.known(okey):
            return LookupResult.HIT
        if not self._check_misses:
            return LookupResult.MISS
        self._probe_gen += 1
        self._probes[okey] = _Probe(gen=self._probe_gen, requests={req_context.req_id})
        self._probe_batch.append((okey, self._probe_gen))
        return LookupResult.RETRY

    def submit_store(self, job_metadata: TransferJob) -> None:
        keys, items = self._job_items(job_metadata)
        self._submit(job_metadata.job_id, self._store_job(job_metadata.job_id, keys, items))

    def submit_load(self, job_metadata: TransferJob) -> None:
        keys, items = self._job_items(job_metadata)
        self._submit(job_metadata.job_id, self._load_job(job_metadata.job_id, keys, items))

    def _job_items(
        self, job: TransferJob
    ) -> tuple[list[OffloadKey], list[tuple[OffloadKey, ObjectKey, int]]]:
        """The job's keys, and (offload key, our key, primary row) for those we can store:
        none for a request whose tenant our keys refuse."""
        tenant = self._tenant(job.req_context)
        keys = list(job.keys)
        items: list[tuple[OffloadKey, ObjectKey, int]] = []
        if tenant.salt is not None and not self._closed:
            for key, chunk in zip(keys, job.chunk_ids, strict=True):
                okey = self._object_key(key, tenant.salt)
                if okey is not None:
                    items.append((key, okey, int(chunk)))
        return keys, items

    def get_finished_jobs(self) -> Iterable[JobResult]:
        self._drain_probe_results()
        out: list[JobResult] = []
        while self._finished:
            out.append(self._finished.popleft())
        # After the results: a failed load's keys are marked before vLLM sees the failure.
        while self._failed_loads:
            self._mark_unloadable(self._failed_loads.popleft())
        return out

    def has_pending_work(self) -> bool:
        with self._inflight_lock:
            busy = bool(self._inflight)
        return busy or self._probes_in_flight > 0 or bool(self._probe_batch)

    def take_events(self) -> Iterable[OffloadingEvent]:
        while self._events:
            yield self._events.popleft()

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        tenant = self._tenant(req_context)
        if tenant.salt is None or self._closed:
            return
        okeys = [k for k in (self._object_key(key, tenant.salt) for key in keys) if k]
        if okeys:
            self._loop.call_soon_threadsafe(self.store.touch, okeys)

    def on_request_finished(self, req_context: ReqContext) -> None:
        req_id = req_context.req_id
        for okey in [k for k, p in self._probes.items() if req_id in p.requests]:
            probe = self._probes[okey]
            probe.requests.discard(req_id)
            if not probe.requests and not probe.in_flight:
                del self._probes[okey]
        with self._salts_lock:
            self._expected_salts.pop(req_id, None)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._drain_probe_results()
        batch, self._probe_batch = self._probe_batch, []
        if not batch or self._closed:
            return
        for okey, gen in batch:
            probe = self._probes.get(okey)
            if probe is not None and probe.gen == gen:
                probe.in_flight = True
        self._probes_in_flight += 1
        self._on_loop(self._probe(batch))

    def drain_jobs(self) -> None:
        while True:
            with self._inflight_lock:
                pending = list(self._inflight.values())
            if not pending:
                return
            concurrent.futures.wait(pending, timeout=1.0)
            if not self._thread.is_alive():
                self._fail_orphans()

    def shutdown(self) -> None:
        """Finish the jobs in flight (bounded by ``shutdown_timeout_s``), close the store
        and stop the loop thread. Never raises for a backend that is down."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._shutdown_timeout
        with self._inflight_lock:
            pending = list(self._inflight.values())
        _, late = concurrent.futures.wait(pending, timeout=self._shutdown_timeout)
        if late:
            log.error(
                "flexkv-store tier: %d job(s) still running at shutdown; closing the store "
                "fails them",
                len(late),
            )
        try:
            left = max(0.1, deadline - time.monotonic())
            self._on_loop(self._close()).result(timeout=left)
        except Exception as exc:
            log.error("flexkv-store tier: closing the store failed: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if not self._thread.is_alive():
            self._loop.close()
        if not late:
            self._rows = np.empty((0, 0), dtype=np.uint8)

    # -- jobs (run on the store loop) ------------------------------------------------

    def _submit(self, job_id: JobId, coro: Coroutine[Any, Any, JobResult]) -> None:
        if self._closed or not self._thread.is_alive():
            coro.close()
            self._finished.append(JobResult(job_id=job_id, success=False))
            return

        async def run() -> None:
            try:
                result = await coro
            except BaseException as exc:  # a job never raises into vLLM (cancelled: failed)
                self._throttle.warn("job", "flexkv-store tier: job %d failed: %r", job_id, exc)
                result = JobResult(job_id=job_id, success=False)
            self._finished.append(result)

        fut = self._on_loop(run())
        with self._inflight_lock:
            self._inflight[job_id] = fut
        fut.add_done_callback(lambda _f: self._job_done(job_id))

    def _job_done(self, job_id: JobId) -> None:
        with self._inflight_lock:
            self._inflight.pop(job_id, None)

    def _row(self, chunk: int) -> memoryview:
        return memoryview(self._rows[chunk])

    async def _store_job(
        self, job_id: JobId, keys: list[OffloadKey], items: list[tuple[OffloadKey, ObjectKey, int]]
    ) -> JobResult:
        """Write the rows. Only storage failures fail the job: a refusal by policy (a
        tenant's quota, a salt our keys refuse) is that tenant's outcome, not the tier's
        health, and vLLM would count it towards backpressure for every tenant."""
        start = time.perf_counter()
        acct = self.store.accounting
        if acct.shared:  # a replica may have stored them: ask the shared accounting
            try:
                held = await acct.contains([o for _, o, _ in items])
            except Exception:  # unknown: write them (a put of a present key is harmless)
                held = [False] * len(items)
        else:
            held = [bool(acct.known(o)) for _, o, _ in items]
        todo = [item for item, h in zip(items, held, strict=True) if not h]
        written: list[OffloadKey] = []
        failed: list[Exception] = []
        refused: list[Exception] = []
        if todo:
            try:
                outcomes = await self.store.put_each([(o, self._row(c)) for _, o, c in todo])
            except Exception as exc:
                outcomes = [exc] * len(todo)
            for (key, _, _), outcome in zip(todo, outcomes, strict=True):
                if outcome is None:
                    written.append(key)
                elif isinstance(outcome, QuotaExceededError | ConcurrentWriteError):
                    refused.append(outcome)  # a tenant's quota, or a replica writing it
                else:
                    failed.append(outcome)
        if failed:
            self._throttle.warn(
                "store",
                "flexkv-store tier: %d of %d chunk(s) not stored: %s",
                len(failed),
                len(keys),
                failed[0],
            )
        if refused:
            self._throttle.warn(
                "refused", "flexkv-store tier: %d chunk(s) refused: %s", len(refused), refused[0]
            )
        if written and self._events_on:
            self._events.append(
                OffloadingEvent(
                    keys=written, medium=Medium.STORAGE, removed=False, locality=self.locality
                )
            )
        return JobResult(
            job_id=job_id,
            success=not failed,
            transfer_time=time.perf_counter() - start,
            transfer_bytes=len(written) * self._row_bytes,
        )

    async def _load_job(
        self, job_id: JobId, keys: list[OffloadKey], items: list[tuple[OffloadKey, ObjectKey, int]]
    ) -> JobResult:
        start = time.perf_counter()

        async def one(okey: ObjectKey, chunk: int) -> bool:
            try:
                n = await self.store.get_into(okey, self._row(chunk))
            except Exception as exc:  # BufferTooSmallError included: not this layout
                self._throttle.warn("load", "flexkv-store tier: load failed: %s", exc)
                return False
            # A shorter object is not a row of this layout: a miss, never partial bytes.
            return n == self._row_bytes

        loaded = await asyncio.gather(*(one(o, c) for _, o, c in items))
        done = {key for (key, _, _), ok in zip(items, loaded, strict=True) if ok}
        failed = [k for k in keys if k not in done]
        unloadable = [o for (_, o, _), ok in zip(items, loaded, strict=True) if not ok]
        if unloadable:
            self._failed_loads.append(unloadable)
        return JobResult(
            job_id=job_id,
            success=not failed,
            successful_keys=None if not failed else tuple(k for k in keys if k in done),
            transfer_time=time.perf_counter() - start,
            transfer_bytes=len(done) * self._row_bytes,
        )

    async def _probe(self, batch: list[tuple[ObjectKey, int]]) -> None:
        okeys = [k for k, _ in batch]
        try:
            found = await self.store.exists_many(okeys)
        except Exception as exc:  # a backend that is down: misses
            self._throttle.warn("lookup", "flexkv-store tier: lookup failed: %s", exc)
            found = [False] * len(okeys)
        self._probe_results.append(
            [(k, gen, ok) for (k, gen), ok in zip(batch, found, strict=True)]
        )

    async def _close(self) -> None:
        if self._admin is not None and self._admin_task is not None:
            # ``should_exit`` ends serve() after its requests; the task closes the socket.
            self._admin.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._admin_task), timeout=5)
            if not self._admin_task.done():
                self._admin_task.cancel()
        await self.store.close()

    # -- scheduler-side bookkeeping ---------------------------------------------------

    def _drain_probe_results(self) -> None:
        while self._probe_results:
            batch = self._probe_results.popleft()
            self._probes_in_flight -= 1
            for okey, gen, found in batch:
                probe = self._probes.get(okey)
                if probe is None or probe.gen != gen:
                    continue  # a newer check replaced it
                probe.in_flight = False
                if not probe.requests:
                    del self._probes[okey]
                    continue
                probe.result = found
                if found:
                    self._unloadable.pop(okey, None)

    def _mark_unloadable(self, okeys: list[ObjectKey]) -> None:
        """A failed load: those keys are misses for the requests that asked, and the
        accounting's word on them is not taken again until a check finds them (vLLM would
        otherwise retry, step after step, a load that cannot succeed)."""
        for okey in okeys:
            self._unloadable[okey] = None
            probe = self._probes.get(okey)
            if probe is not None and probe.result is not None:
                probe.result = False
        while len(self._unloadable) > 65536:
            del self._unloadable[next(iter(self._unloadable))]


def _tier_config(
    config: str | Mapping[str, Any] | None, backend: str | None, store_keys: Mapping[str, Any]
) -> dict[str, Any]:
    """The store config from a tier entry: ``config`` (file or dict) or ``backend``, with
    any other store keys merged over it."""
    if config is not None and backend is not None:
        raise ConfigError("tier entry: give 'config' or 'backend', not both")
    base: dict[str, Any]
    if config is None:
        base = {}
    elif isinstance(config, Mapping):
        base = dict(config)
    elif isinstance(config, (str, Path)):
        base = read_config_file(config)
    else:
        raise ConfigError(f"tier entry: 'config' must be a file path or a dict (got {config!r})")
    if backend is not None:
        base.pop("backends", None)
        base["backend"] = backend
    if not base.get("backend") and not base.get("backends") and not store_keys.get("backends"):
        raise ConfigError(
            "tier entry: name the storage with 'config' (a flexkv-store config file or dict) "
            "or 'backend' (a URL such as 'fs:///var/cache/kv')"
        )
    return _merge(base, store_keys)


class FlexKVStoreConnector(OffloadingConnector):
    """vLLM's ``OffloadingConnector``, telling flexkv-store tiers each request's tenant.

    The tenant is the request's ``cache_salt`` (the OpenAI API field, which vLLM also
    hashes into the request's first block), else ``kv_transfer_params["cache_salt"]``,
    else none (accounted as ``_default``). Everything else is vLLM's own connector.
    """

    def on_new_request(self, request: Request) -> None:
        salt: Any = getattr(request, "cache_salt", None)
        if not salt:
            params = getattr(request, "kv_transfer_params", None)
            salt = params.get("cache_salt") if isinstance(params, dict) else None
        for tier in self._flexkv_tiers():
            tier.expect_request(request.request_id, salt)
        super().on_new_request(request)

    def _flexkv_tiers(self) -> list[FlexKVStoreTier]:
        scheduler = self.connector_scheduler
        manager = getattr(scheduler, "manager", None) if scheduler is not None else None
        tiers = getattr(manager, "secondary_tiers", ())
        return [t for t in tiers if isinstance(t, FlexKVStoreTier)]
