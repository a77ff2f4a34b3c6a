"""One process of bench/quota.py's shared-accounting section (run as a subprocess).

Usage: python bench/_shared_acct.py MODE WHERE N PROCESS_INDEX
MODE ``admit``: N admissions (admit, then commit, one object each, as a put does) through
SqliteAccounting (WHERE: the database path); ``touch``: N touches, flushed in batches as
the store does; ``bare``: N bare ``INSERT`` transactions on a one-table database (the
baseline). ``redis-admit`` / ``redis-touch`` the same through RedisAccounting (WHERE: a
``redis://`` URL; the barrier file is then /tmp/<url hash>.go), ``redis-bare``: N ``INCRBY``
sent in pipelines of 100 (the baseline the issue names).
Prints {"seconds": s} after a start barrier (the file DB + ".go" appears).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

# bench/ itself must not be on the path: bench/redis.py would shadow redis-py.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from flexkv_store.keyformat import ObjectKey  # noqa: E402
from flexkv_store.quota._sqlite import SqliteAccounting  # noqa: E402


def _go(where: str) -> str:
    if "://" in where:
        import hashlib

        return f"/tmp/flexkv-bench-{hashlib.sha1(where.encode()).hexdigest()[:12]}.go"
    return where + ".go"


def _wait(db: str) -> None:
    while not os.path.exists(_go(db)):
        time.sleep(0.001)


def _redis_acct(url: str, **kw: object) -> object:
    from flexkv_store.backends.config import RedisConfig
    from flexkv_store.quota._redis_acct import RedisAccounting

    return RedisAccounting(RedisConfig.from_url(url), **kw)  # type: ignore[arg-type]


async def admit(db: str, n: int, me: int) -> float:
    acct: Any = _redis_acct(db) if "://" in db else SqliteAccounting(db)
    await acct.open()
    keys = [ObjectKey("m", me, i.to_bytes(4, "big"), f"s{i % 3}") for i in range(n)]
    _wait(db)
    start = time.perf_counter()
    for key in keys:
        out = await acct.admit([(key, 4096)], each=False)
        await acct.commit(out.admissions)  # as the Store commits after the write
    took = time.perf_counter() - start
    await acct.close()
    return took


async def touch(db: str, n: int, me: int) -> float:
    acct: Any = (
        _redis_acct(db, touch_interval=3600)
        if "://" in db
        else SqliteAccounting(db, touch_interval=3600)
    )
    await acct.open()
    keys = [ObjectKey("m", me, i.to_bytes(4, "big"), f"s{i % 3}") for i in range(n)]
    await acct.record([(k, 4096) for k in keys])
    _wait(db)
    start = time.perf_counter()
    for i, key in enumerate(keys):
        acct.touch([key])
        if i % 100 == 99:  # what the 100 ms batching amounts to at a few thousand hits/s
            await acct.flush()
    await acct.flush()
    took = time.perf_counter() - start
    await acct.close()
    return took


def bare(db: str, n: int, me: int) -> float:
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, n INTEGER)")
    _wait(db)
    start = time.perf_counter()
    for i in range(n):
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t VALUES (?, ?)", (f"{me}:{i}", 4096))
        con.execute("COMMIT")
    took = time.perf_counter() - start
    con.close()
    return took


def redis_bare(url: str, n: int, me: int) -> float:
    import redis

    r = redis.Redis.from_url(url)
    r.ping()
    _wait(url)
    start = time.perf_counter()
    for i in range(0, n, 100):
        pipe = r.pipeline(transaction=False)
        for j in range(i, min(n, i + 100)):
            pipe.incrby(f"bench:{me}:{j % 3}", 4096)
        pipe.execute()
    took = time.perf_counter() - start
    r.close()
    return took


def main() -> None:
    mode, db, n, me = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "bare":
        took = bare(db, n, me)
    elif mode == "redis-bare":
        took = redis_bare(db, n, me)
    elif mode in ("admit", "redis-admit"):
        took = asyncio.run(admit(db, n, me))
    else:
        took = asyncio.run(touch(db, n, me))
    print(json.dumps({"seconds": took}))


if __name__ == "__main__":
    main()
