"""Our tier under vLLM 0.33's real offloading code (TieringOffloadingManager, Scheduler).

vLLM is installed by ``make test`` (``vllm==0.33.0 --no-deps`` plus the packages its
imports need); under ``CI=true`` a missing vLLM fails instead of skipping.
"""
# ruff: noqa: E402  (vLLM's modules are imported after the check that it is installed)

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
try:
    import vllm  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the machine
    if IN_CI:
        raise RuntimeError("vLLM is required under CI=true (make test installs it)") from exc
    pytest.skip(f"vLLM is not installed: {exc}", allow_module_level=True)

import numpy as np
import yaml
from servers import RedisServer, start_or_skip, start_redis, unique_prefix
from vllm.v1.kv_offload.base import (
    LookupResult,
    OffloadKey,
    get_offload_block_hash,
    make_offload_key,
)
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory
from vllm_harness import Tiering, offloading_config, random_keys, tier_entry

from flexkv_store.errors import ConfigError
from flexkv_store.integrations.vllm import FlexKVStoreTier
from flexkv_store.keyformat import ObjectKey, chunk_keys
from flexkv_store.store import open_store

ROOT = Path(__file__).resolve().parents[1]
ROW = 64 * 1024  # 16 KiB per worker block x 4 blocks per chunk


def _rows(keys: list[OffloadKey], size: int = ROW) -> dict[OffloadKey, bytes]:
    return {k: os.urandom(size) for k in keys}


@pytest.fixture(params=["fs", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """A store config for the tier: an fs directory, or a fresh prefix on a real Redis."""
    if request.param == "fs":
        return {"backend": f"fs://{tmp_path / 'kv'}"}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"backend": {"type": "redis", "url": server.url, "key_prefix": unique_prefix()}}


@pytest.fixture
def tiering(backend: dict[str, Any]) -> Iterator[Tiering]:
    t = Tiering(offloading_config([tier_entry(config=backend)]))
    try:
        yield t
    finally:
        t.close()


def _docs_example() -> tuple[list[str], dict[str, Any], str]:
    """The ``vllm serve`` command line and the config file of docs/vllm.md."""
    text = (ROOT / "docs" / "vllm.md").read_text(encoding="utf-8")
    command = re.search(r"```bash\n(vllm serve .*?)\n```", text, re.S)
    config = re.search(r"```yaml\n# /etc/flexkv\.yaml\n(.*?)```", text, re.S)
    assert command and config, "docs/vllm.md lost its example"
    argv = shlex.split(command.group(1).replace("\\\n", " "))
    return argv, json.loads(argv[argv.index("--kv-transfer-config") + 1]), config.group(1)


# -- the documented entry, built by vLLM's factory -----------------------------------------


def test_documented_tier_entry_builds_through_vllms_factory(tmp_path: Path) -> None:
    argv, kv_config, config_yaml = _docs_example()
    assert argv[:2] == ["vllm", "serve"] and "--block-size" in argv
    assert kv_config["kv_connector"] == "FlexKVStoreConnector"
    assert kv_config["kv_connector_module_path"] == "flexkv_store.integrations.vllm"
    extra = kv_config["kv_connector_extra_config"]
    assert extra["spec_name"] == "TieringOffloadingSpec"
    (entry,) = extra["secondary_tiers"]
    assert entry["config"] == "/etc/flexkv.yaml"
    # The documented file, pointed at a temporary directory instead of /var/cache.
    doc = yaml.safe_load(config_yaml)
    doc["backend"] = f"fs://{tmp_path / 'kv'}"
    path = tmp_path / "flexkv.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    entry = {**entry, "config": str(path)}
    assert SecondaryTierFactory.get_tier_class(entry) is FlexKVStoreTier
    t = Tiering(offloading_config([entry]))
    try:
        ctx = t.request("tenant-a")
        rows = _rows(random_keys(3))
        t.store(ctx, rows)
        t.drop_primary()
        assert t.load(t.request("tenant-a"), list(rows)) == rows
        quota = doc["quota"]["quotas"]["tenant-a"]
        assert t.tier.store.lru.quota("tenant-a") == quota
    finally:
        t.close()


def test_tier_entry_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name the storage with 'config'"):
        Tiering(offloading_config([tier_entry()]))
    with pytest.raises(ConfigError, match="not both"):
        Tiering(offloading_config([tier_entry(config={}, backend="memory://")]))
    with pytest.raises(ConfigError, match="quota"):
        Tiering(offloading_config([tier_entry(backend="memory://", quota={"nope": 1})]))
    with pytest.raises(ConfigError, match="model_name"):
        Tiering(offloading_config([tier_entry(backend="memory://")], model="a@b"))


# -- store and load through vLLM's manager -----------------------------------------------


def test_rows_round_trip_bit_identical(tiering: Tiering) -> None:
    ctx = tiering.request("alice")
    rows = _rows(random_keys(6))
    tiering.store(ctx, rows)
    stored = [e for e in tiering.storage_events() if not e.removed]
    assert sorted(k for e in stored for k in e.keys) == sorted(rows)
    # What the tier wrote: one object per row, keyed by the chunk's last block hash.
    objects = dict(tiering.tier.store.lru.iter_lru("alice"))
    assert len(objects) == 6 and set(objects.values()) == {tiering.row_bytes}
    assert {k.chunk_hash for k in objects} == {get_offload_block_hash(k) for k in rows}
    tiering.drop_primary()
    got = tiering.load(tiering.request("alice"), list(rows))
    assert got == rows


def test_other_salt_and_unknown_keys_miss(tiering: Tiering) -> None:
    rows = _rows(random_keys(2))
    tiering.store(tiering.request("alice"), rows)
    tiering.drop_primary()
    found = tiering.lookup_all(tiering.request("bob"), rows)
    assert set(found.values()) == {LookupResult.MISS}
    found = tiering.lookup_all(tiering.request(), rows)  # unattributed: the "" tenant
    assert set(found.values()) == {LookupResult.MISS}
    assert set(tiering.lookup_all(tiering.request("alice"), random_keys(2)).values()) == {
        LookupResult.MISS
    }
    assert tiering.load(tiering.request("alice"), list(rows)) == rows


@pytest.mark.parametrize(
    "other",
    [{"dtype": "bfloat16"}, {"world_size": 2}, {"blocks_per_chunk": 2}, {"layers": ("x.0",)}],
    ids=["dtype", "tp", "chunk", "layers"],
)
def test_other_layout_misses(tmp_path: Path, other: dict[str, Any]) -> None:
    """A row written under one layout is a miss under another (same keys, same backend),
    never its bytes: TP size, dtype (same row size!), chunk size, layers."""
    entry = tier_entry(backend=f"fs://{tmp_path / 'kv'}")
    first = Tiering(offloading_config([entry]))
    rows = _rows(random_keys(3))
    try:
        first.store(first.request("alice"), rows)
    finally:
        first.close()
    second = Tiering(offloading_config([entry], **other))
    try:
        assert second.tier.layouts[0] != first.tier.layouts[0]
        found = second.lookup_all(second.request("alice"), rows)
        assert set(found.values()) == {LookupResult.MISS}
    finally:
        second.close()
    again = Tiering(offloading_config([entry]))  # the writer's layout still finds them
    try:
        assert again.load(again.request("alice"), list(rows)) == rows
    finally:
        again.close()


def test_restart_finds_what_the_previous_run_stored(backend: dict[str, Any]) -> None:
    entry = tier_entry(config=backend)
    first = Tiering(offloading_config([entry]))
    rows = _rows(random_keys(4))
    try:
        first.store(first.request("alice"), rows)
    finally:
        first.close()
    second = Tiering(offloading_config([entry]))  # a new engine: new shm region, same store
    try:
        assert second.load(second.request("alice"), list(rows)) == rows
    finally:
        second.close()


def test_chunks_written_by_another_process_are_found(tmp_path: Path) -> None:
    """A replica writing the same directory: the accounting does not know the objects,
    the tier checks the backend (one RETRY) and finds them."""
    t = Tiering(offloading_config([tier_entry(backend=f"fs://{tmp_path / 'kv'}")]))
    try:
        keys = random_keys(2)
        rows = _rows(keys, t.row_bytes)
        rank = t.tier._rank_of[0]
        with open_store(f"fs://{tmp_path / 'kv'}").blocking() as other:
            other.put_many(
                (ObjectKey(t.tier.model_name, rank, get_offload_block_hash(k), "alice"), v)
                for k, v in rows.items()
            )
        ctx = t.request("alice")
        assert t.manager.lookup(keys[0], ctx) is LookupResult.RETRY
        assert t.load(ctx, keys) == rows
    finally:
        t.close()


# -- tenants and quotas -------------------------------------------------------------------


def test_quota_eviction_per_salt_is_a_storage_removal_event(backend: dict[str, Any]) -> None:
    cfg = {**backend, "quota": {"quotas": {"alice": 3 * ROW, "carol": ROW // 2}}}
    t = Tiering(offloading_config([tier_entry(config=cfg)]))
    try:
        alice = list(_rows(random_keys(5)).items())
        bob = _rows(random_keys(2))
        t.store(t.request("bob"), bob)
        for key, row in alice:  # one request each: the oldest are evicted first
            t.store(t.request("alice"), {key: row})
        events = t.storage_events()
        removed = [k for e in events if e.removed for k in e.keys]
        assert removed == [alice[0][0], alice[1][0]]
        assert t.tier.store.lru.usage("alice").nbytes == 3 * ROW
        # carol's quota is below one row: her stores fail, nobody else's
        carol = _rows(random_keys(1))
        t.store(t.request("carol"), carol)
        assert t.tier.store.lru.usage("carol").nbytes == 0
        t.drop_primary()
        assert t.load(t.request("alice"), [k for k, _ in alice[2:]]) == dict(alice[2:])
        assert t.load(t.request("alice"), [alice[0][0]]) == {alice[0][0]: None}
        assert t.load(t.request("bob"), list(bob)) == bob
        assert t.load(t.request("carol"), list(carol)) == dict.fromkeys(carol)
    finally:
        t.close()


def test_two_replicas_share_one_quota_through_the_shared_accounting(tmp_path: Path) -> None:
    """Two engines (two vLLM managers, as data-parallel ranks) over one directory with
    quota.accounting: sqlite: one hard quota for both, and each finds the other's chunks."""
    cfg = {
        "backend": f"fs://{tmp_path / 'kv'}",
        "quota": {"accounting": "sqlite", "quotas": {"alice": 3 * ROW}},
    }
    a = Tiering(offloading_config([tier_entry(config=cfg)]))
    b = Tiering(offloading_config([tier_entry(config=cfg)]))
    try:
        first = _rows(random_keys(2))
        a.store(a.request("alice"), first)
        found = b.load(b.request("alice"), list(first))  # written by the other replica
        assert found == first
        b.store(b.request("alice"), _rows(random_keys(2)))  # 4 rows > quota of 3
        used = asyncio.run(_usage(tmp_path))
        assert used == 3 * ROW
        removed = [k for e in b.storage_events() if e.removed for k in e.keys]
        assert removed == [next(iter(first))]  # b evicted a's oldest: one LRU for both
    finally:
        a.close()
        b.close()


async def _usage(tmp_path: Path) -> int:
    from flexkv_store.quota._sqlite import SqliteAccounting

    acct = SqliteAccounting(tmp_path / "kv" / "flexkv-accounting.sqlite")
    await acct.open()
    try:
        return (await acct.usage("alice")).nbytes
    finally:
        await acct.close()


def test_quota_refusal_fails_only_those_keys(tmp_path: Path) -> None:
    """One job with chunks of two tenants is impossible (a job is one request), so the
    refusal is per request: the refused request's job reports failure, vLLM goes on."""
    cfg = {"backend": f"fs://{tmp_path / 'kv'}", "quota": {"quotas": {"tiny": 1}}}
    t = Tiering(offloading_config([tier_entry(config=cfg)]))
    try:
        t.store(t.request("tiny"), _rows(random_keys(2)))
        ok = _rows(random_keys(2))
        t.store(t.request("other"), ok)
        t.drop_primary()
        assert t.load(t.request("other"), list(ok)) == ok
    finally:
        t.close()


def test_invalid_salt_is_not_offloaded(tmp_path: Path) -> None:
    t = Tiering(offloading_config([tier_entry(backend=f"fs://{tmp_path / 'kv'}")]))
    try:
        rows = _rows(random_keys(1))
        t.store(t.request("a/b"), rows)  # '/' is not allowed in a salt
        assert t.tier.store.lru.total_objects == 0
        t.drop_primary()
        assert set(t.lookup_all(t.request("a/b"), rows).values()) == {LookupResult.MISS}
    finally:
        t.close()


def test_touch_makes_chunks_recently_used(tmp_path: Path) -> None:
    cfg = {"backend": f"fs://{tmp_path / 'kv'}", "quota": {"quotas": {"alice": 2 * ROW}}}
    t = Tiering(offloading_config([tier_entry(config=cfg)]))
    try:
        first, second, third = (_rows(random_keys(1)) for _ in range(3))
        t.store(t.request("alice"), first)
        t.store(t.request("alice"), second)
        t.manager.touch(list(first), t.request("alice"))  # a GPU prefix-cache hit
        t.store(t.request("alice"), third)
        removed = [k for e in t.storage_events() if e.removed for k in e.keys]
        assert removed == list(second)
    finally:
        t.close()


def test_tier_serves_the_admin_api(tmp_path: Path) -> None:
    """serve_admin: usage and quota changes through the vLLM process's own store."""
    import httpx
    from servers import free_port

    port = free_port()
    cfg = {"backend": f"fs://{tmp_path / 'kv'}", "admin": {"host": "127.0.0.1", "port": port}}
    t = Tiering(offloading_config([tier_entry(config=cfg, serve_admin=True)]))
    try:
        rows = list(_rows(random_keys(3)).items())
        for key, row in rows:
            t.store(t.request("alice"), {key: row})
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                usage = httpx.get(f"{base}/api/quota/alice", timeout=5).json()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert usage["current_usage_bytes"] == 3 * ROW
        reply = httpx.put(f"{base}/api/quota/alice", json={"limit_bytes": ROW}, timeout=10)
        assert reply.status_code == 200, reply.text
        assert reply.json()["evicted_objects"] == 2
        removed = [k for e in t.storage_events() if e.removed for k in e.keys]
        assert removed == [rows[0][0], rows[1][0]]
        assert "flexkv_store_usage_bytes" in httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        t.close()


def test_admin_api_problems_are_startup_errors(tmp_path: Path) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cfg = {"backend": f"fs://{tmp_path / 'kv'}", "admin": {"host": "127.0.0.1", "port": port}}
        with pytest.raises(ConfigError, match="cannot listen"):
            Tiering(offloading_config([tier_entry(config=cfg, serve_admin=True)]))
    finally:
        busy.close()
    cfg = {"backend": f"fs://{tmp_path / 'kv'}", "admin": {"host": "0.0.0.0", "port": 0}}
    with pytest.raises(ConfigError, match="without a token"):
        Tiering(offloading_config([tier_entry(config=cfg, serve_admin=True)]))


def test_refusals_do_not_put_the_tier_under_backpressure(tmp_path: Path) -> None:
    """Refused salts and quotas fail nobody else: vLLM counts failed store jobs towards
    the tier's backpressure, so refusals are not failures."""
    entry = tier_entry(
        config={"backend": f"fs://{tmp_path / 'kv'}", "quota": {"quotas": {"tiny": 1}}},
        backpressure={"backpressure_cls": "EMABackpressureDetector", "failure_threshold": 3},
    )
    t = Tiering(offloading_config([entry], num_chunks=32))
    try:
        for _ in range(3):
            t.store(t.request("x/y"), _rows(random_keys(1)))  # a salt our keys refuse
            t.store(t.request("tiny"), _rows(random_keys(1)))  # over its quota
        good = _rows(random_keys(2))
        t.store(t.request("alice"), good)
        assert len(dict(t.tier.store.lru.iter_lru("alice"))) == 2
    finally:
        t.close()


def test_a_request_over_its_quota_reports_only_what_stays(tmp_path: Path) -> None:
    """One job with more chunks than the tenant's quota holds: the later chunks evict the
    earlier ones of the same job; the STORAGE events name only what is stored."""
    cfg = {"backend": f"fs://{tmp_path / 'kv'}", "quota": {"quotas": {"alice": 2 * ROW}}}
    t = Tiering(offloading_config([tier_entry(config=cfg)]))
    try:
        rows = _rows(random_keys(4))
        t.store(t.request("alice"), rows)
        events = t.storage_events()
        assert not any(e.removed for e in events)  # nothing stored was removed
        stored = {k for e in events if not e.removed for k in e.keys}
        held = {k.chunk_hash for k in dict(t.tier.store.lru.iter_lru("alice"))}
        assert {get_offload_block_hash(k) for k in stored} == held and len(held) == 2
    finally:
        t.close()


# -- faults ---------------------------------------------------------------------------------


def test_backend_down_gives_misses_and_failed_stores_then_recovers(tmp_path: Path) -> None:
    server = start_or_skip("redis-server", lambda: start_redis(tmp_path / "redis"))
    cfg = {"backend": {"type": "redis", "url": server.url, "socket_timeout": 1.0}}
    t = Tiering(offloading_config([tier_entry(config=cfg)]))
    try:
        before = _rows(random_keys(2))
        t.store(t.request("alice"), before)
        server.kill()
        t.drop_primary()
        # the index still lists them, the loads fail: misses for vLLM, no exception
        assert t.load(t.request("alice"), list(before)) == dict.fromkeys(before)
        failed = _rows(random_keys(2))
        t.store(t.request("alice"), failed)  # cascades fail; vLLM keeps the CPU copies
        server.start()  # a restart: the data is gone (no persistence)
        t.drop_primary()
        t.storage_events()
        assert t.load(t.request("alice"), list(before)) == dict.fromkeys(before)
        assert t.load(t.request("alice"), list(failed)) == dict.fromkeys(failed)
        # what the backend lost is forgotten and reported as removed
        t.wait_idle()
        t.tier._on_loop(t.tier.store.wait_idle()).result(timeout=10)
        removed = {k for e in t.storage_events() if e.removed for k in e.keys}
        assert set(before) <= removed
        after = _rows(random_keys(2))
        t.store(t.request("alice"), after)
        t.drop_primary()
        assert t.load(t.request("alice"), list(after)) == after
    finally:
        start = time.monotonic()
        t.close()
        assert time.monotonic() - start < 10
        server.stop()


def test_shutdown_with_backend_down_does_not_hang(tmp_path: Path) -> None:
    server = start_or_skip("redis-server", lambda: start_redis(tmp_path / "redis"))
    cfg = {"backend": {"type": "redis", "url": server.url, "socket_timeout": 1.0}}
    t = Tiering(offloading_config([tier_entry(config=cfg, shutdown_timeout_s=5)]))
    server.kill()
    t.submit_store(t.request("alice"), _rows(random_keys(3)))
    start = time.monotonic()
    t.close()
    assert time.monotonic() - start < 10
    server.stop()


# -- keys: ours equal vLLM's ------------------------------------------------------------------


def _vllm_request(tokens: list[int], salt: str | None) -> Any:
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256_cbor)
    params = SamplingParams(max_tokens=4)
    params.update_from_generation_config({}, 2)
    return Request(
        request_id=f"r-{os.urandom(4).hex()}",
        prompt_token_ids=tokens,
        sampling_params=params,
        pooling_params=None,
        cache_salt=salt,
        block_hasher=get_request_block_hasher(16, sha256_cbor),
    )


@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_chunk_keys_equal_vllms_offload_keys(
    salt: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    tokens = [(31 * i + 7) % 32000 for i in range(300)]
    req = _vllm_request(tokens, salt)
    # vLLM's scheduler keys a chunk of 4 blocks by its last block (update_offload_keys)
    vllm_keys = [make_offload_key(h, 0) for h in req.block_hashes[3::4]]
    ours = chunk_keys(tokens, model_name="m", kv_rank=0, chunk_size=64, block_size=16,
                      cache_salt=salt or "")  # fmt: skip
    assert [make_offload_key(k.chunk_hash, 0) for k in ours] == vllm_keys
    assert len(ours) == 300 // 64


# -- the Scheduler with our connector, offline ----------------------------------------------


def _scheduler(tmp_path: Path, backend: str) -> Any:
    """vLLM's Scheduler with FlexKVStoreConnector + TieringOffloadingSpec + our tier,
    built from a local config.json (no hub, no GPU)."""
    import torch
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )
    from vllm.v1.structured_output import StructuredOutputManager

    model = tmp_path / "tiny-opt"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["OPTForCausalLM"],
                "model_type": "opt",
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "ffn_dim": 128,
                "vocab_size": 50272,
                "max_position_embeddings": 2048,
                "word_embed_proj_dim": 64,
                "do_layer_norm_before": True,
                "torch_dtype": "float16",
                "bos_token_id": 2,
                "eos_token_id": 2,
                "pad_token_id": 1,
            }
        )
    )
    extra = {
        "spec_name": "TieringOffloadingSpec",
        "cpu_bytes_to_use": 32 * 1024 * 1024,
        "block_size": 64,
        "tier_poll_interval_s": 0,
        "secondary_tiers": [tier_entry(backend=backend)],
    }
    vllm_config = VllmConfig(
        model_config=ModelConfig(
            model=str(model), skip_tokenizer_init=True, dtype="float16", seed=0
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=4,
            max_num_batched_tokens=512,
            max_model_len=2048,
            is_encoder_decoder=False,
        ),
        cache_config=CacheConfig(
            block_size=16, enable_prefix_caching=True, prefix_caching_hash_algo="sha256_cbor"
        ),
        kv_transfer_config=KVTransferConfig(
            kv_connector="FlexKVStoreConnector",
            kv_connector_module_path="flexkv_store.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        ),
        device_config=DeviceConfig("cpu"),
    )
    vllm_config.cache_config.kv_cache_layout = "LBHNC"
    blocks = 256
    spec = FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=16, dtype=torch.float16)
    layers = [f"model.decoder.layers.{i}.self_attn.attn" for i in range(2)]
    page = spec.page_size_bytes
    kv_cache_config = KVCacheConfig(
        num_blocks=blocks,
        kv_cache_tensors=[
            KVCacheTensor(
                size=page * blocks * 2, layers=layers, layer_stride=page * blocks, block_stride=page
            )
        ],
        kv_cache_groups=[KVCacheGroupSpec(layers, spec)],
    )
    vllm_config.cache_config.num_gpu_blocks = blocks
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        log_stats=True,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=16,
    )


def _load_jobs_of(scheduler: Any, req_id: str, steps: int = 50) -> list[Any]:
    """Schedule until the connector plans loads (CPU -> GPU) for ``req_id``."""
    for _ in range(steps):
        out = scheduler.schedule()
        meta = out.kv_connector_metadata
        jobs = [j for j in meta.load_jobs.values() if j.req_id == req_id] if meta else []
        if jobs:
            return jobs
        if req_id in out.num_scheduled_tokens:
            return []  # scheduled without loading anything
        time.sleep(0.01)
    raise TimeoutError(f"{req_id} was neither loaded nor scheduled")


def test_scheduler_routes_cache_salt_to_the_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's cache_salt reaches our tier through FlexKVStoreConnector: its chunks,
    stored beforehand under that salt with chunk_keys(block_size=16, chunk_size=64), are
    found and loaded into vLLM's CPU tier; the same tokens of another tenant are not."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    url = f"fs://{tmp_path / 'kv'}"
    scheduler = _scheduler(tmp_path, url)
    try:
        connector = scheduler.connector
        assert type(connector).__name__ == "FlexKVStoreConnector"
        tier = connector.scheduler.manager.secondary_tiers[0]
        assert isinstance(tier, FlexKVStoreTier)
        tokens = [(17 * i + 3) % 50000 for i in range(200)]
        keys = chunk_keys(tokens, model_name=tier.model_name, kv_rank=tier._rank_of[0],
                          chunk_size=64, block_size=16, cache_salt="alice")  # fmt: skip
        rows = {k: os.urandom(tier._row_bytes) for k in keys}
        with open_store(url).blocking() as other:  # e.g. another replica wrote them
            other.put_many(rows.items())
        alice = _vllm_request(tokens, "alice")
        scheduler.add_request(alice)
        jobs = _load_jobs_of(scheduler, alice.request_id)
        assert jobs, "alice's stored chunks were not loaded"
        view = np.asarray(connector.scheduler.manager.primary_tier.get_kv_memoryview())
        loaded = {bytes(view[int(c)].view(np.uint8)) for j in jobs for c in j.src_spec.chunk_ids}
        assert loaded == set(rows.values())  # every full chunk, bit-identical
        del view
        # bob sends the same tokens: other block hashes (vLLM hashes the salt) and another
        # tenant in our tier; a tenant named only in kv_transfer_params: same hashes as an
        # unsalted request, still another tenant here
        bob = _vllm_request(tokens, "bob")
        scheduler.add_request(bob)
        assert _load_jobs_of(scheduler, bob.request_id) == []
        carol = _vllm_request(tokens, None)
        carol.kv_transfer_params = {"cache_salt": "carol"}
        scheduler.add_request(carol)
        assert _load_jobs_of(scheduler, carol.request_id) == []
        probed = {k.cache_salt for k in tier._probes}
        assert {"bob", "carol"} <= probed
    finally:
        scheduler.shutdown()
