"""Drive vLLM's own offloading manager with our tier, as vLLM's scheduler does.

Shared by tests/test_vllm.py and bench/vllm_tier.py. Everything here is vLLM's code:
``TieringOffloadingSpec`` builds the CPU primary tier (a real shared-memory region) and
our tier through ``SecondaryTierFactory`` from a tier entry; the helpers only call the
manager's methods in the order the scheduler calls them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadKey,
    ReqContext,
    ScheduleEndContext,
    make_offload_key,
)
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
from vllm.v1.kv_offload.tiering.manager import TieringOffloadingManager
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from flexkv_store.integrations.vllm import FlexKVStoreTier

TIER_MODULE = "flexkv_store.integrations.vllm"


def tier_entry(**keys: Any) -> dict[str, Any]:
    """A ``secondary_tiers`` entry naming our tier, with its keys."""
    return {"type": "FlexKVStoreTier", "module_path": TIER_MODULE, **keys}


def offloading_config(
    tiers: Sequence[Mapping[str, Any]],
    *,
    model: str = "Qwen/Qwen3-0.6B",
    dtype: str = "float16",
    num_chunks: int = 16,
    blocks_per_chunk: int = 4,
    worker_bytes_per_block: int = 16 * 1024,
    world_size: int = 1,
    layers: Sequence[str] = ("model.layers.0.attn", "model.layers.1.attn"),
    kv_events: bool = True,
    engine_id: str | None = None,
) -> OffloadingConfig:
    """The normalized config vLLM's connector builds (``build_offloading_config``)."""
    row = worker_bytes_per_block * blocks_per_chunk * world_size
    page = os.sysconf("SC_PAGE_SIZE")
    row = -(-row // page) * page
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=tuple(layers), group_id=0),),
        worker_kv_bytes_per_block=worker_bytes_per_block,
        enable_kv_cache_events=kv_events,
        extra_config={
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": row * num_chunks,
            "blocks_per_chunk": blocks_per_chunk,
            "secondary_tiers": [dict(t) for t in tiers],
            "tier_poll_interval_s": 0,
        },
        engine_id=engine_id or f"flexkv-test-{uuid.uuid4().hex[:12]}",
        model=OffloadingModelConfig(name=model, dtype=dtype),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=blocks_per_chunk),
        parallel=OffloadingParallelConfig(
            rank=0,
            world_size=world_size,
            tp_size=world_size,
            pp_size=1,
            pcp_size=1,
            dcp_size=1,
            data_parallel_index=0,
            data_parallel_size=1,
            data_parallel_rank_local=None,
            is_parallelism_agnostic=False,
        ),
    )


def random_keys(n: int) -> list[OffloadKey]:
    """Offload keys of ``n`` chunks (random 32-byte block hashes, group 0)."""
    return [make_offload_key(os.urandom(32), 0) for _ in range(n)]


class Tiering:
    """vLLM's ``TieringOffloadingManager`` (CPU primary tier + our tier), driven by hand."""

    def __init__(self, config: OffloadingConfig) -> None:
        self.spec = TieringOffloadingSpec(config)
        manager = self.spec.get_manager()
        assert isinstance(manager, TieringOffloadingManager)
        self.manager = manager
        tier = manager.secondary_tiers[0]
        assert isinstance(tier, FlexKVStoreTier)
        self.tier = tier
        self.rows = np.asarray(manager.primary_tier.get_kv_memoryview()).view(np.uint8)
        self.row_bytes = int(self.rows.shape[1])
        self._n = 0

    # -- the scheduler's calls -------------------------------------------------------

    def request(self, salt: str | None = None, **params: Any) -> ReqContext:
        """A new request (``salt`` travels in ``kv_transfer_params``, as the connector's
        fallback path does)."""
        self._n += 1
        kv_params = dict(params)
        if salt is not None:
            kv_params["cache_salt"] = salt
        ctx = ReqContext(req_id=f"req-{self._n}", kv_transfer_params=kv_params or None)
        self.manager.on_new_request(ctx)
        return ctx

    def finish(self, ctx: ReqContext) -> None:
        self.manager.on_request_finished(ctx)

    def step(self) -> None:
        self.manager.on_schedule_end(ScheduleEndContext(new_req_ids=[], preempted_req_ids=()))

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.step()
            if not self.manager.has_pending_work():
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the tier still has work in flight")
            time.sleep(0.002)

    def store(
        self, ctx: ReqContext, rows: Mapping[OffloadKey, bytes | np.ndarray[Any, Any]]
    ) -> None:
        """GPU -> CPU store of ``rows`` (written into the primary slots vLLM hands out),
        then vLLM cascades them to our tier; returns once those jobs finished."""
        self.submit_store(ctx, rows)
        self.wait_idle()

    def submit_store(
        self, ctx: ReqContext, rows: Mapping[OffloadKey, bytes | np.ndarray[Any, Any]]
    ) -> None:
        keys = list(rows)
        out = self.manager.prepare_store(keys, ctx)
        assert out is not None, "the primary tier is full"
        spec = out.store_spec
        assert isinstance(spec, CPULoadStoreSpec)
        for key, chunk in zip(out.keys_to_store, spec.chunk_ids, strict=True):
            self.rows[int(chunk)] = np.frombuffer(bytes(rows[key]), dtype=np.uint8)
        self.manager.complete_store(keys, ctx)

    def lookup_all(
        self, ctx: ReqContext, keys: Iterable[OffloadKey], timeout: float = 60.0
    ) -> dict[OffloadKey, LookupResult]:
        """Look every key up until each is HIT (in the primary tier) or MISS, stepping
        the manager between rounds as the scheduler does."""
        todo = list(keys)
        done: dict[OffloadKey, LookupResult] = {}
        deadline = time.monotonic() + timeout
        while todo:
            for key in list(todo):
                r = self.manager.lookup(key, ctx)
                if r in (LookupResult.HIT, LookupResult.MISS):
                    done[key] = r
                    todo.remove(key)
            if not todo:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(todo)} lookups still pending")
            self.step()
            time.sleep(0.002)
        return done

    def load(self, ctx: ReqContext, keys: Sequence[OffloadKey]) -> dict[OffloadKey, bytes | None]:
        """Each key's row as vLLM would hand it to the GPU, or None (a miss)."""
        found = self.lookup_all(ctx, keys)
        out: dict[OffloadKey, bytes | None] = {}
        for key in keys:
            if found[key] is not LookupResult.HIT:
                out[key] = None
                continue
            spec = self.manager.prepare_load([key], ctx)
            assert isinstance(spec, CPULoadStoreSpec)
            out[key] = self.rows[int(spec.chunk_ids[0])].tobytes()
            self.manager.complete_load([key], ctx)
        return out

    def drop_primary(self) -> None:
        """Empty the CPU tier (vLLM's reset_cache, e.g. on sleep), so loads come from ours."""
        self.manager.reset_cache()
        self.manager.on_reset_flushed()

    def storage_events(self) -> list[OffloadingEvent]:
        return [e for e in self.manager.take_events() if e.medium is Medium.STORAGE]

    def close(self) -> None:
        self.rows = np.empty((0, 0), dtype=np.uint8)  # vLLM releases the region next
        self.manager.shutdown()
