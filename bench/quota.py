"""Benchmark UserLRU bookkeeping against an OrderedDict baseline.

``python bench/quota.py [--quick]`` prints one JSON document and ``main(argv)`` returns it.
Two figures per implementation, measured in the same run:

* ``ops_per_s``: a mixed stream of touch (50%), admit of a new key (35%, each evicting about
  one object once the store is full), admit overwriting a key (5%) and remove (10%), over
  ``--objects`` tracked objects spread across ``--salts`` salts. Scenario ``quota`` gives every
  salt a quota (the salt-local eviction path); scenario ``capacity`` sets only a global
  capacity (the global-LRU eviction path). Timed in CPU seconds of this process
  (``time.process_time``), so that other load on a shared machine skews the ratio less.
* ``bytes_per_object``: tracemalloc's count of what the structure allocates while it admits
  ``--objects`` objects, divided by that count. The keys and sizes are created beforehand by
  the caller and are not counted.

Targets (DESIGN section 4, checked by eye, never asserted): >= 200k ops/s and <= 300 bytes
per object at 1M objects and 1000 salts. Sections are listed in ``SECTIONS``; each is a
function of the parsed arguments returning a JSON-able dict.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

if __package__ in (None, ""):
    # Run as a script from a checkout without the package installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexkv_store.errors import QuotaExceededError
from flexkv_store.keyformat import ObjectKey
from flexkv_store.quota._userlru import UserLRU

TOUCH, ADMIT, REMOVE = 0, 1, 2
SIZES = (1 << 18, 1 << 19, 1 << 20, 1 << 21)


class _Tracker(Protocol):
    def admit(self, key: ObjectKey, size: int) -> object: ...
    def touch(self, key: ObjectKey) -> bool: ...
    def remove(self, key: ObjectKey) -> int | None: ...


class OrderedDictLRU:
    """The baseline: an OrderedDict per salt plus a global one, same admit rules as UserLRU.

    Only what the benchmark calls: admit, touch, remove.
    """

    def __init__(
        self, quotas: dict[str, int], default_quota: int | None, capacity: int | None
    ) -> None:
        self._quotas = quotas
        self._default = default_quota
        self._capacity = capacity
        self._salts: dict[str, OrderedDict[ObjectKey, int]] = {}
        self._used: dict[str, int] = {}
        self._global: OrderedDict[ObjectKey, None] = OrderedDict()
        self._total = 0

    def admit(self, key: ObjectKey, size: int) -> list[tuple[ObjectKey, int]]:
        salt = key.cache_salt
        limit = self._quotas.get(salt, self._default)
        cap = self._capacity
        if limit is not None and (size > limit or limit == 0):
            raise QuotaExceededError(salt, size, limit)
        if cap is not None and (size > cap or cap == 0):
            raise QuotaExceededError(salt, size, cap)
        od = self._salts.get(salt)
        if od is None:
            od = self._salts[salt] = OrderedDict()
            self._used[salt] = 0
        old = od.pop(key, None)
        if old is not None:
            self._used[salt] -= old
            self._total -= old
            del self._global[key]
        victims: list[tuple[ObjectKey, int]] = []
        if limit is not None:
            while self._used[salt] + size > limit:
                victim, vsize = od.popitem(last=False)
                del self._global[victim]
                self._used[salt] -= vsize
                self._total -= vsize
                victims.append((victim, vsize))
        if cap is not None:
            while self._total + size > cap:
                victim, _ = self._global.popitem(last=False)
                vsalt = victim.cache_salt
                vsize = self._salts[vsalt].pop(victim)
                self._used[vsalt] -= vsize
                self._total -= vsize
                victims.append((victim, vsize))
        od[key] = size
        self._global[key] = None
        self._used[salt] += size
        self._total += size
        return victims

    def touch(self, key: ObjectKey) -> bool:
        od = self._salts.get(key.cache_salt)
        if od is None or key not in od:
            return False
        od.move_to_end(key)
        self._global.move_to_end(key)
        return True

    def remove(self, key: ObjectKey) -> int | None:
        salt = key.cache_salt
        od = self._salts.get(salt)
        if od is None or key not in od:
            return None
        size = od.pop(key)
        del self._global[key]
        self._used[salt] -= size
        self._total -= size
        return size


Factory = Callable[[dict[str, int], int | None], _Tracker]


def _make_userlru(quotas: dict[str, int], capacity: int | None) -> _Tracker:
    lru = UserLRU(capacity=capacity)
    for salt, limit in quotas.items():
        lru.set_quota(salt, limit)
    return lru


def _make_ordereddict(quotas: dict[str, int], capacity: int | None) -> _Tracker:
    return OrderedDictLRU(dict(quotas), None, capacity)


IMPLEMENTATIONS: dict[str, Factory] = {
    "userlru": _make_userlru,
    "ordereddict": _make_ordereddict,
}


class Workload:
    """Keys, sizes and an op stream, generated once and replayed on every implementation."""

    def __init__(self, objects: int, salts: int, ops: int, seed: int) -> None:
        rng = random.Random(seed)
        self.salt_names = [f"tenant-{i:04d}" for i in range(salts)]
        self.keys: list[ObjectKey] = []
        # The caller's size objects: shared, so they count for neither implementation.
        self.sizes: list[int] = []
        for _ in range(objects):
            self._new_key(rng)
        self.initial = objects
        self.mean_size = sum(SIZES) // len(SIZES)
        stream: list[tuple[int, ObjectKey, int]] = []
        for _ in range(ops):
            r = rng.random()
            nxt = len(self.keys)
            # Hits and deletes go to keys among the last `objects` written: most are tracked.
            recent = rng.randrange(max(0, nxt - objects), nxt)
            if r < 0.50:
                stream.append((TOUCH, self.keys[recent], 0))
            elif r < 0.85:
                self._new_key(rng)
                stream.append((ADMIT, self.keys[nxt], self.sizes[nxt]))
            elif r < 0.90:
                stream.append((ADMIT, self.keys[recent], rng.choice(SIZES)))
            else:
                stream.append((REMOVE, self.keys[recent], 0))
        self.stream = stream

    def _new_key(self, rng: random.Random) -> None:
        i = len(self.keys)
        salt = rng.choice(self.salt_names)
        self.keys.append(ObjectKey("bench/model", 0, i.to_bytes(8, "big"), salt))
        self.sizes.append(rng.choice(SIZES))

    def fill(self, tracker: _Tracker) -> None:
        keys, sizes = self.keys, self.sizes
        for i in range(self.initial):
            tracker.admit(keys[i], sizes[i])

    def limits(self, scenario: str) -> tuple[dict[str, int], int | None]:
        """Quotas and capacity that the initial objects just fill (so admits evict)."""
        full = self.initial * self.mean_size
        if scenario == "quota":
            per_salt = full // len(self.salt_names)
            return dict.fromkeys(self.salt_names, per_salt), None
        return {}, full


def _replay(tracker: _Tracker, stream: Sequence[tuple[int, ObjectKey, int]]) -> dict[str, Any]:
    touch, admit, remove = tracker.touch, tracker.admit, tracker.remove
    hits = refused = 0
    gc.collect()
    start = time.process_time()
    for op, key, size in stream:
        if op == TOUCH:
            hits += touch(key)
        elif op == ADMIT:
            try:
                admit(key, size)
            except QuotaExceededError:
                refused += 1
        else:
            remove(key)
    elapsed = time.process_time() - start
    return {
        "ops": len(stream),
        "seconds": round(elapsed, 3),
        "ops_per_s": round(len(stream) / elapsed),
        "touch_hits": hits,
        "refused": refused,
    }


def _memory(factory: Factory, work: Workload) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracker = factory({}, None)
        work.fill(tracker)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del tracker
    return {"bytes_per_object": round((after - before) / work.initial, 1)}


def bench_userlru(args: argparse.Namespace) -> dict[str, Any]:
    """UserLRU and the OrderedDict baseline: ops/s per scenario, bytes per object, ratios."""
    work = Workload(args.objects, args.salts, args.ops, args.seed)
    out: dict[str, Any] = {}
    for name, factory in IMPLEMENTATIONS.items():
        res: dict[str, Any] = _memory(factory, work)
        for scenario in ("quota", "capacity"):
            quotas, capacity = work.limits(scenario)
            tracker = factory(quotas, capacity)
            start = time.process_time()
            work.fill(tracker)
            fill_s = time.process_time() - start
            res[scenario] = {"fill_ops_per_s": round(work.initial / fill_s)}
            res[scenario].update(_replay(tracker, work.stream))
            del tracker
        out[name] = res
    new, old = out["userlru"], out["ordereddict"]
    out["ratios"] = {
        "ops_per_s_quota": round(new["quota"]["ops_per_s"] / old["quota"]["ops_per_s"], 2),
        "ops_per_s_capacity": round(new["capacity"]["ops_per_s"] / old["capacity"]["ops_per_s"], 2),
        "bytes_per_object": round(new["bytes_per_object"] / old["bytes_per_object"], 2),
    }
    out["targets_met"] = {
        "ops_per_s>=200k": min(new["quota"]["ops_per_s"], new["capacity"]["ops_per_s"]) >= 200_000,
        "bytes_per_object<=300": new["bytes_per_object"] <= 300,
    }
    return out


def bench_admin_api(args: argparse.Namespace) -> dict[str, Any]:
    """Admin API requests/s over a real socket, beside a bare FastAPI route (bench/api.py)."""
    from bench import api

    return api.main(["--quick"] if args.quick else [])


def _run_procs(mode: str, db: Path | str, procs: int, n: int) -> float:
    """``procs`` processes doing ``n`` operations each, started together: aggregate ops/s."""
    import subprocess

    script = Path(__file__).resolve().parent / "_shared_acct.py"
    if "://" in str(db):
        import hashlib

        go = Path(f"/tmp/flexkv-bench-{hashlib.sha1(str(db).encode()).hexdigest()[:12]}.go")
    else:
        go = Path(str(db) + ".go")
    go.unlink(missing_ok=True)
    children = [
        subprocess.Popen(
            [sys.executable, str(script), mode, str(db), str(n), str(i)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(procs)
    ]
    time.sleep(1.0 + 0.3 * procs)  # let every child open its connection
    go.touch()
    seconds = []
    for child in children:
        out, _ = child.communicate(timeout=600)
        seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
    return float(procs * n / max(seconds))


def bench_shared_accounting(args: argparse.Namespace) -> dict[str, Any]:
    """Admissions/s and touches/s of the sqlite accounting with 1 and 4 processes, beside
    a bare ``INSERT`` transaction per operation on the same disk (the floor of any
    transaction-per-admission design). Target: >= 5k admissions/s across 4 processes."""
    import tempfile

    n = 500 if args.quick else 3000
    out: dict[str, Any] = {"ops_per_process": n}
    with tempfile.TemporaryDirectory(prefix="flexkv-bench-acct-") as tmp:
        for procs in (1, 4):
            row: dict[str, Any] = {}
            for mode in ("bare", "admit", "touch"):
                db = Path(tmp) / f"{mode}-{procs}.sqlite"
                row[f"{mode}_per_s"] = round(_run_procs(mode, db, procs, n))
            row["admit_ratio"] = ratio_of(row["admit_per_s"], row["bare_per_s"])
            row["touch_ratio"] = ratio_of(row["touch_per_s"], row["bare_per_s"])
            out[f"sqlite_{procs}_process{'es' if procs > 1 else ''}"] = row
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from servers import start_redis

        server = start_redis(Path(tmp) / "redis", unix_socket=False)
        try:
            for procs in (1, 4):
                row = {}
                for mode in ("bare", "admit", "touch"):
                    url = f"{server.url}"
                    server_flush(url)
                    row[f"{mode}_per_s"] = round(_run_procs(f"redis-{mode}", url, procs, n))
                row["admit_ratio"] = ratio_of(row["admit_per_s"], row["bare_per_s"])
                row["touch_ratio"] = ratio_of(row["touch_per_s"], row["bare_per_s"])
                out[f"redis_{procs}_process{'es' if procs > 1 else ''}"] = row
        finally:
            server.stop()
    out["baselines"] = {
        "sqlite": "one bare INSERT transaction (BEGIN IMMEDIATE; INSERT; COMMIT) per op, WAL",
        "redis": "INCRBY in pipelines of 100 (redis-py, hiredis)",
    }
    out["target"] = "admissions >= 5000/s aggregate across 4 processes"
    return out


def server_flush(url: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()


def ratio_of(value: float, baseline: float) -> float | None:
    return round(value / baseline, 3) if baseline else None


#: (name, function of the parsed arguments) for each section of the report, in order.
SECTIONS: list[tuple[str, Callable[[argparse.Namespace], dict[str, Any]]]] = [
    ("userlru", bench_userlru),
    ("admin_api", bench_admin_api),
    ("shared_accounting", bench_shared_accounting),
]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k objects, 100k ops")
    parser.add_argument("--objects", type=int, default=None, help="tracked objects (1M)")
    parser.add_argument("--salts", type=int, default=1000, help="distinct salts (1000)")
    parser.add_argument("--ops", type=int, default=None, help="mixed ops per run (1M)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.objects is None:
        args.objects = 100_000 if args.quick else 1_000_000
    if args.ops is None:
        args.ops = 100_000 if args.quick else 1_000_000
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every section and print the JSON report; returns it."""
    args = _parse(argv)
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "objects": args.objects,
        "salts": args.salts,
        "ops": args.ops,
    }
    for name, section in SECTIONS:
        report[name] = section(args)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
