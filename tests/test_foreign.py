"""Data we did not write (DESIGN section 14): never deleted, replaced or accounted.

A directory holds LMCache 0.4.6 files, LMCache 0.5.6 files (names from both releases' own
functions: the golden vectors), stray files and our objects, and is opened in every fs mode
(flat/sharded x framed/raw with each ``lmcache`` generation) and by gds. Through reads,
scans, a restart, quota eviction under a tight quota and ``fsck`` with and without
``--repair``, every file that is not ours stays byte-identical, and usage counts only our
objects. In a raw directory the names of the declared generation *are* keys (that is what
the declaration says); every other file is foreign there. The same for Redis and S3 with
other programs' values and other deployments' objects under our prefix.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from servers import MotoServer, RedisServer, unique_prefix
from vectors_util import load, load_local

from flexkv_store.backends import FsConfig, GdsConfig, RedisConfig, S3Config
from flexkv_store.backends._fs import FsAdapter
from flexkv_store.backends._gds import GdsAdapter
from flexkv_store.backends._redis import RedisAdapter
from flexkv_store.backends._s3 import S3Adapter
from flexkv_store.backends.base import L2Adapter
from flexkv_store.cli import main as cli
from flexkv_store.errors import KeyFormatError, StorageError
from flexkv_store.keyformat import ObjectKey, frame, from_filename_v05
from flexkv_store.quota import JsonQuotaState
from flexkv_store.store import Store

V04 = [c for c in load("keyformat.json")["valid"] if "@" in c["filename"]]
V05 = load_local("lmcache05_keys.json")["valid"]
OBJ = 6000  # bytes of each of our objects
#: What each of our tenants writes, and its quota: alice and bob write twice their quota.
TENANTS = {"alice": (6, 3), "bob": (4, 2), "": (2, 10)}


def _ours(i: int, salt: str) -> ObjectKey:
    return ObjectKey("org/our-model", 7, i.to_bytes(4, "big"), salt)


def _payload(key: ObjectKey) -> bytes:
    return (key.chunk_hash * (OBJ // len(key.chunk_hash) + 1))[:OBJ]


# -- the shared directory ------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    kind: str  # fs or gds
    layout: str
    format: str
    lmcache: str = "0.4"

    @property
    def id(self) -> str:
        fmt = self.format if self.format == "framed" else f"raw{self.lmcache}"
        return f"{self.kind}-{self.layout}-{fmt}"

    def config(self, path: Path) -> FsConfig:
        cls = GdsConfig if self.kind == "gds" else FsConfig
        return cls.model_validate(
            {
                "path": str(path),
                "layout": self.layout,
                "format": self.format,
                "lmcache": self.lmcache,
            }
        )

    def open(self, path: Path) -> FsAdapter:
        cfg = self.config(path)
        return GdsAdapter(cfg) if isinstance(cfg, GdsConfig) else FsAdapter(cfg)

    def declared(self, name: str) -> ObjectKey | None:
        """The key a file name is in this mode's declared generation, if it is one."""
        if self.format == "framed":
            return None  # framed files are ours only by their header
        try:
            if self.lmcache == "0.5":
                key, group = from_filename_v05(name)
                return key if group == 0 else None
            return ObjectKey.from_filename(name)
        except KeyFormatError:
            return None


MODES = [
    Mode(kind, layout, fmt, gen)
    for kind in ("fs",)
    for layout in ("flat", "sharded")
    for fmt, gen in (("framed", "0.4"), ("raw", "0.4"), ("raw", "0.5"))
] + [Mode("gds", "sharded", "framed"), Mode("gds", "flat", "framed")]


def _lmcache_files() -> dict[str, bytes]:
    """LMCache 0.4.6 and 0.5.6 files as their fs adapters name them; raw KV bytes."""
    files: dict[str, bytes] = {}
    for i, case in enumerate([*V04, *V05]):
        size = (100, 5000, 9000)[i % 3]
        files[case["filename"]] = bytes((i * 37 + j) % 251 for j in range(size))
    return files


#: Other programs' files: not object names at all, or object-like names that are not ours.
STRAYS = {
    "notes.txt": b"a user's notes",
    "README": b"",
    "x.data": b"not a key",
    "llama@0x0000002a@deadbeef.tmp": b"LMCache 0.5's temp file",
    "h-" + "ab" * 32 + ".data": b"looks hashed, is not ours" * 200,
}


def _populate(root: Path, mode: Mode, adapter: FsAdapter) -> dict[Path, bytes]:
    """Put LMCache's files and the strays where the adapter would look for such names (and,
    sharded, at the root where LMCache writes them); return every file that is placed."""
    placed: dict[Path, bytes] = {}
    for name, raw in [*_lmcache_files().items(), *STRAYS.items()]:
        where = {Path(adapter._dir_of(name)), root}
        for d in where:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(raw)
            placed[d / name] = raw
    return placed


def _split(
    mode: Mode, adapter: FsAdapter, placed: dict[Path, bytes]
) -> tuple[dict[Path, bytes], dict[Path, tuple[ObjectKey, bytes]]]:
    """``(foreign files, declared files)``: what must survive, and what is a key here."""
    foreign: dict[Path, bytes] = {}
    declared: dict[Path, tuple[ObjectKey, bytes]] = {}
    for path, raw in placed.items():
        key = mode.declared(path.name)
        if key is not None and Path(adapter.object_path(key)) == path:
            declared[path] = (key, raw)
        else:
            foreign[path] = raw
    return foreign, declared


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)


def _assert_intact(foreign: dict[Path, bytes]) -> None:
    for path, raw in foreign.items():
        assert path.is_file(), f"{path.name} was removed"
        assert path.read_bytes() == raw, f"{path.name} was changed"


def _usage(store: Store) -> dict[str, tuple[int, int]]:
    return {
        s: (q.objects, q.current_usage_bytes)
        for s, q in store.quota.usage().items()
        if q.objects or q.current_usage_bytes
    }


def _expected_usage(
    store_keys: set[ObjectKey], declared: dict[Path, tuple[ObjectKey, bytes]]
) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = {}
    for key in store_keys:
        t = out.setdefault(key.cache_salt, [0, 0])
        t[0] += 1
        t[1] += OBJ
    for path, (key, raw) in declared.items():
        if path.exists():
            t = out.setdefault(key.cache_salt, [0, 0])
            t[0] += 1
            t[1] += len(raw)
    return {s: (o, n) for s, (o, n) in out.items()}


async def _live_ours(store: Store) -> set[ObjectKey]:
    live = set()
    for salt, (count, _) in TENANTS.items():
        for i in range(count):
            key = _ours(i, salt)
            got = await store.get(key)
            if got is not None:
                assert got == _payload(key)
                live.add(key)
    return live


def _named_keys() -> list[ObjectKey]:
    """Every key any of LMCache's files could be read as (either generation)."""
    keys = []
    for name in _lmcache_files():
        for parse in (ObjectKey.from_filename, lambda n: from_filename_v05(n)[0]):
            try:
                keys.append(parse(name))
            except KeyFormatError:
                pass
    return keys


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.id)
async def test_foreign_files_survive_everything(tmp_path: Path, mode: Mode) -> None:
    root = tmp_path / "kv"
    probe = mode.open(root)
    placed = _populate(root, mode, probe)
    await probe.aclose()
    if mode.format == "framed":
        # Our framing under a name its header does not name: another key's object.
        a_key, b_key = (
            ObjectKey("org/our-model", 7, b"\xaa"),
            ObjectKey("org/our-model", 7, b"\xbb"),
        )
        async with mode.open(root) as a:
            await a.put(a_key, b"moved here by someone" * 100)
            src, dst = Path(a.object_path(a_key)), Path(a.object_path(b_key))
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            placed[dst] = _read(dst)
    foreign, declared = _split(mode, probe, placed)
    assert len(foreign) >= len(STRAYS)
    if mode.format == "raw":
        assert declared, "the declared generation's files are keys in a raw directory"

    quotas = {salt: quota * OBJ for salt, (_, quota) in TENANTS.items() if salt}
    state = JsonQuotaState(tmp_path / "quota.json")
    async with Store([mode.open(root)], quotas=quotas, quota_state=state) as store:
        # restart recovery of the prepared directory: only declared files are accounted
        assert _usage(store) == _expected_usage(set(), declared)
        for salt, (count, _) in TENANTS.items():
            for i in range(count):
                await store.put(_ours(i, salt), _payload(_ours(i, salt)))
        fs = store.backends[0]
        assert isinstance(fs, FsAdapter)
        a = fs

        # reads of every key LMCache's names parse to: a miss unless declared here
        declared_keys = {k for k, _ in declared.values()}
        for key in _named_keys():
            # (a declared file may have been evicted by the puts above: its tenant's quota)
            want = next((r for p, (k, r) in declared.items() if k == key and p.exists()), None)
            assert await a.get(key) == want
            assert await a.get_many([key]) == [want]
            assert await a.size(key) == (None if want is None else len(want))
            out = bytearray(10_000)
            assert await a.get_into(key, out) == (None if want is None else len(want))
            assert await store.get(key) == want
        # a delete of a foreign name is a miss, and a put over one is refused (framed)
        for path in foreign:
            for key in _named_keys():
                if Path(a.object_path(key)) == path and key not in declared_keys:
                    assert await a.delete(key) is False
                    if mode.format == "framed":
                        with pytest.raises(StorageError, match="did not write"):
                            await a.put(key, b"ours")
        if mode.format == "framed":
            assert await a.get(b_key) is None  # our framing, but another key's header
        _assert_intact(foreign)

        scanned = {i.key async for i in a.scan()}
        live = await _live_ours(store)
        assert {k for k in scanned if k.model_name == "org/our-model"} == live
        assert scanned - live <= declared_keys
        assert _usage(store) == _expected_usage(live, declared)
        # the quotas held: each tenant kept at most its quota of our objects
        for salt, (_, quota) in TENANTS.items():
            assert sum(1 for k in live if k.cache_salt == salt) <= quota

    # a restart rebuilds the same usage from the directory
    async with Store([mode.open(root)], quotas=quotas, quota_state=state) as store:
        live = await _live_ours(store)
        assert _usage(store) == _expected_usage(live, declared)
        # quota eviction under a tight quota: everything of ours goes, nothing foreign
        for salt in ("alice", "bob", ""):
            await store.quota.set_quota(salt, 0)
        assert await _live_ours(store) == set()
        assert _usage(store) == _expected_usage(set(), declared)
        _assert_intact(foreign)

    async with mode.open(root) as a:
        for repair in (False, True):
            report = await a.check(repair=repair)
            assert report.corrupt == []
            assert {Path(p) for p in report.foreign} >= set(foreign)
            assert report.foreign_removed == 0
            _assert_intact(foreign)
        assert a.corrupt_objects == 0
        assert {i.key async for i in a.scan()} <= {k for k, _ in declared.values()}

    # only --remove-foreign removes them (through the CLI, as a user would)
    url = f"{mode.kind}://{root}?layout={mode.layout}&format={mode.format}&lmcache={mode.lmcache}"
    assert await asyncio.to_thread(cli, ["fsck", "--backend", url, "--json"]) == 0
    _assert_intact(foreign)
    assert await asyncio.to_thread(cli, ["fsck", "--backend", url, "--remove-foreign"]) == 0
    assert not any(p.exists() for p in foreign)


async def test_raw_v05_reads_and_writes_group_zero_names(tmp_path: Path) -> None:
    cfg = FsConfig(path=str(tmp_path), layout="flat", format="raw", lmcache="0.5")
    async with FsAdapter(cfg) as a:
        for case in V05:
            (tmp_path / case["filename"]).write_bytes(case["filename"].encode())
        got = {i.key: i.size async for i in a.scan()}
        zero = [c for c in V05 if c["object_group_id"] == 0]
        assert len(got) == len(zero) < len(V05)
        for case in zero:
            key = ObjectKey(
                case["model_name"], case["kv_rank"], bytes.fromhex(case["chunk_hash_hex"]),
                case["cache_salt"],
            )  # fmt: skip
            assert await a.get(key) == case["filename"].encode()
        new = ObjectKey("meta-llama/Llama-3-8B", 1, b"\x01\x02", "carol")
        await a.put(new, b"from us")
        assert (
            tmp_path / "meta-llama-SEP-Llama-3-8B@0x00000001@0@0102@carol.data"
        ).read_bytes() == (b"from us")
        overlong = ObjectKey("m" * 240, 1, b"\x01" * 16)
        with pytest.raises(ValueError, match="255"):
            await a.put(overlong, b"x")


def test_lmcache_generation_is_checked() -> None:
    assert FsConfig(path="/x", format="raw", lmcache=0.5).lmcache == "0.5"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format: raw"):
        FsConfig(path="/x", lmcache="0.5")
    with pytest.raises(ValueError, match="lmcache"):
        FsConfig(path="/x", format="raw", lmcache="0.6")  # type: ignore[arg-type]


# -- Redis and S3: foreign keys under the prefix -------------------------------------------


def _kv(i: int, model: str = "m", salt: str = "") -> ObjectKey:
    return ObjectKey(model, 0, i.to_bytes(2, "big"), salt)


@dataclass
class Shared:
    """One backend namespace: ours, a deployment under a longer prefix, other values."""

    open: Callable[[str], L2Adapter]
    ours: str
    longer: str
    raw_get: Callable[[str], Any]
    raw_set: Callable[[str, bytes], Any]


async def _run_reverse(ns: Shared) -> None:
    """The shorter prefix's objects seen from the longer one: a model named ``b:m`` under
    ``kv:`` lands at ``kv:b:m@...``, which ``kv:b:`` parses as model ``m`` (a shorter key
    than the header's): never listed, read, sized or deleted from there."""
    model = ns.longer[len(ns.ours) :] + "m"
    async with ns.open(ns.ours) as short:
        theirs = [_kv(i, model=model, salt="alice") for i in range(3)]
        for k in theirs:
            await short.put(k, b"short prefix" * 10)
        names = [ns.ours + k.to_wire() for k in theirs]
        before = {n: await ns.raw_get(n) for n in names}
        async with ns.open(ns.longer) as long:
            assert [i async for i in long.scan()] == []
            for k in theirs:
                seen_as = ObjectKey(
                    k.model_name[len(model) - 1 :], k.kv_rank, k.chunk_hash, "alice"
                )
                assert await long.get(seen_as) is None
                assert await long.size(seen_as) is None
                assert await long.exists_many([seen_as]) == [False]
                assert await long.delete(seen_as) is False
                assert await long.delete_many([seen_as]) == [False]
            assert set(await _foreign_names(long)) >= set(names)
        for n, raw in before.items():
            assert await ns.raw_get(n) == raw, f"{n} changed"
        for k in theirs:
            assert await short.delete(k)


async def _foreign_names(a: L2Adapter) -> list[str]:
    return [n async for n in a.scan_foreign()]


async def _run_shared(ns: Shared, tmp_path: Path) -> None:
    await _run_reverse(ns)
    other = ns.open(ns.longer)
    async with other:
        for i in range(5):
            await other.put(_kv(i, salt="alice"), b"prod" * 500)
    # Values of another program with well-formed names under our prefix: no header at all,
    # and a header of ours naming another key (copied from the longer prefix's object).
    theirs = {
        ns.ours + _kv(100, salt="alice").to_wire(): b"someone else's value",
        ns.ours + "m@00000000@0@abcd": b"LMCache 0.5 wire name",
        ns.ours + "notes": b"a user's key",
        ns.ours + _kv(101, salt="alice").to_wire(): b"".join(frame(_kv(9), b"x" * 50)),
    }
    for name, raw in theirs.items():
        await ns.raw_set(name, raw)
    longer_names = [ns.longer + _kv(i, salt="alice").to_wire() for i in range(5)]
    before = {n: await ns.raw_get(n) for n in [*theirs, *longer_names]}

    async def intact() -> None:
        for n, raw in before.items():
            assert await ns.raw_get(n) == raw, f"{n} changed"

    state = JsonQuotaState(tmp_path / "q.json")
    async with Store([ns.open(ns.ours)], quotas={"alice": 3 * 1000}, quota_state=state) as store:
        assert _usage(store) == {}, "nothing of the longer prefix or the others is accounted"
        ours = [_kv(200 + i, salt="alice") for i in range(6)]
        for k in ours:
            await store.put(k, b"o" * 1000)
        a = store.backends[0]
        for name in theirs:
            try:
                key = ObjectKey.from_wire(name[len(ns.ours) :])
            except KeyFormatError:
                continue  # not a key's name at all
            assert await a.get(key) is None
            assert await a.size(key) is None
            assert await a.delete(key) is False
            assert await a.delete_many([key]) == [False]
        # the longer prefix's objects parse as model "<rest of prefix>m" here: not ours
        for n in longer_names:
            key = ObjectKey.from_wire(n[len(ns.ours) :])
            assert await a.get(key) is None
            assert await a.delete(key) is False
        listed = {i.key async for i in a.scan()}
        assert listed <= set(ours) and len(listed) == 3
        assert _usage(store) == {"alice": (3, 3000)}
        await intact()
    async with Store([ns.open(ns.ours)], quotas={"alice": 0}, quota_state=state) as store:
        assert _usage(store) == {}  # evicted at start under the quota 0: only ours
        await intact()
    a = ns.open(ns.ours)
    async with a:
        for repair in (False, True):
            report = await a.check(repair=repair)
            assert set(report.foreign) >= {*theirs, *longer_names}
            assert report.corrupt == [] and report.foreign_removed == 0
            await intact()
        report = await a.check(remove_foreign=True)
        assert report.foreign_removed >= len(theirs) + len(longer_names)
    for n in [*theirs, *longer_names]:
        assert await ns.raw_get(n) is None
    async with ns.open(ns.longer) as other:
        assert [i async for i in other.scan()] == []


@pytest.mark.parametrize(("ours", "longer"), [("", "prod:"), ("kv:", "kv:b:")])
async def test_redis_prefixes_isolate(
    redis_server: RedisServer, tmp_path: Path, ours: str, longer: str
) -> None:
    # The empty prefix owns its whole database: it gets database 5 (no other test uses it).
    base, db = (unique_prefix(), 0) if ours else ("", 5)
    port = redis_server.port
    client = redis.asyncio.Redis(port=port, db=db)
    if not ours:
        await client.flushdb()
    ns = Shared(
        open=lambda p: RedisAdapter(RedisConfig(port=port, db=db, key_prefix=p)),
        ours=base + ours,
        longer=base + longer,
        raw_get=client.get,
        raw_set=client.set,
    )
    try:
        await _run_shared(ns, tmp_path)
    finally:
        async for name in client.scan_iter(match=base.encode() + b"*"):
            await client.unlink(name)
        await client.aclose()


@pytest.fixture
def s3_namespace(moto_server: MotoServer) -> Iterator[Callable[[str, str], Shared]]:
    bucket = "flexkv-foreign"
    creds: dict[str, Any] = {
        "endpoint_url": moto_server.endpoint_url,
        "region_name": "us-east-1",
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
    }
    client = boto3.client("s3", **creds)
    client.create_bucket(Bucket=bucket)

    async def raw_get(name: str) -> bytes | None:
        try:
            body: bytes = client.get_object(Bucket=bucket, Key=name)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
        return body

    async def raw_set(name: str, raw: bytes) -> None:
        client.put_object(Bucket=bucket, Key=name, Body=raw)

    def make(ours: str, longer: str) -> Shared:
        return Shared(
            open=lambda p: S3Adapter(
                S3Config.model_validate(
                    {
                        "bucket": bucket,
                        "prefix": p,
                        "endpoint_url": moto_server.endpoint_url,
                        "region": "us-east-1",
                        "addressing_style": "path",
                        "access_key_id": "test",
                        "secret_access_key": "test",
                        "max_concurrency": 4,
                    }
                )
            ),
            ours=ours,
            longer=longer,
            raw_get=raw_get,
            raw_set=raw_set,
        )

    yield make
    boto3.resource("s3", **creds).Bucket(bucket).objects.all().delete()


async def test_s3_prefixes_isolate(
    s3_namespace: Callable[[str, str], Shared], tmp_path: Path
) -> None:
    base = unique_prefix()
    await _run_shared(s3_namespace(base + "prod/", base + "prod/canary/"), tmp_path)


async def test_fs_put_never_replaces_another_keys_file_and_get_into_misses(tmp_path: Path) -> None:
    a_key, b_key = ObjectKey("m", 0, b"\xaa"), ObjectKey("m", 0, b"\xbb")
    async with FsAdapter(FsConfig(path=str(tmp_path), layout="flat")) as a:
        await a.put(a_key, b"a" * 5000)
        moved = Path(a.object_path(b_key))
        os.replace(a.object_path(a_key), moved)  # our framing, another key's header
        raw = _read(moved)
        with pytest.raises(StorageError, match="did not write"):
            await a.put(b_key, b"b")
        assert _read(moved) == raw
        # a foreign file larger than the buffer: a miss, not BufferTooSmallError
        lm = Path(a.object_path(ObjectKey("m", 0, b"\xcc")))
        _write(lm, b"L" * 20_000)
        assert await a.get_into(ObjectKey("m", 0, b"\xcc"), bytearray(100)) is None
        assert await a.get_into(b_key, bytearray(100)) is None
        assert _read(lm) == b"L" * 20_000 and _read(moved) == raw


async def test_remove_foreign_keeps_the_stores_own_state(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # fs: the quota file and the sqlite accounting live in the data root
    cfg = FsConfig(path=str(tmp_path / "kv"), layout="flat")
    store = Store([FsAdapter(cfg)], accounting=None)
    await store.open()
    await store.put(_ours(1, "alice"), b"x" * 100)
    await store.close()
    root = tmp_path / "kv"
    state = [root / n for n in ("flexkv-accounting.sqlite", "flexkv-accounting.sqlite-wal")]
    for p in state:
        p.write_bytes(b"state")
    (root / "stray.txt").write_bytes(b"stray")
    async with FsAdapter(cfg) as a:
        report = await a.check(remove_foreign=True)
    assert report.foreign_removed == 1 and not (root / "stray.txt").exists()
    assert all(p.exists() for p in state)
    # Redis: the quota hash and the shared accounting's keys under the prefix
    prefix = unique_prefix()
    client = redis.asyncio.Redis(port=redis_server.port)
    try:
        await client.hset(prefix + "flexkv-store:quotas", "alice", 1)
        await client.set(prefix + "acct:{s:00}:x", b"1")
        await client.set(prefix + "stray", b"1")
        async with RedisAdapter(RedisConfig(port=redis_server.port, key_prefix=prefix)) as r:
            report = await r.check(remove_foreign=True)
        assert report.foreign == [prefix + "stray"] and report.foreign_removed == 1
        assert await client.exists(prefix + "flexkv-store:quotas", prefix + "acct:{s:00}:x") == 2
    finally:
        async for name in client.scan_iter(match=prefix.encode() + b"*"):
            await client.unlink(name)
        await client.aclose()
