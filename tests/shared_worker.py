"""A worker process for the shared-accounting tests: random puts, gets and deletes of
random sizes (a key's size is fixed, as a KV chunk's is) through a Store opened from a
config, until its op count is done.

Usage: python tests/shared_worker.py CONFIG_JSON SEED OPS [SALT=QUOTA ...]
Prints one JSON line at the end: {"puts": n, "refused": n, "errors": n}.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys

from flexkv_store.errors import QuotaExceededError, StorageError
from flexkv_store.keyformat import ObjectKey
from flexkv_store.store import open_store


def _dump_tasks() -> None:
    # SIGUSR1 (sent by a test that waited too long): where every task is waiting.
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


async def main() -> None:
    if hasattr(signal, "SIGUSR1"):
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    config = json.loads(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))
    ops = int(sys.argv[3])
    salts = [a.split("=")[0] for a in sys.argv[4:]]
    counts = {"puts": 0, "refused": 0, "errors": 0, "gets": 0, "deletes": 0}
    async with open_store(config) as store:
        for _ in range(ops):
            salt = rng.choice(salts)
            key = ObjectKey("m", 0, rng.randrange(200).to_bytes(2, "big"), salt)
            r = rng.random()
            try:
                if r < 0.7:
                    # A key always has the same size (as a KV chunk, whose hash names its
                    # bytes): concurrent writes of one key by two processes are equal.
                    idx = [rng.randrange(200) for _ in range(rng.randrange(1, 4))]
                    batch = [
                        (
                            ObjectKey("m", 0, i.to_bytes(2, "big"), salt),
                            os.urandom(1 + (i * 7919 + len(salt) * 104729) % (48 * 1024)),
                        )
                        for i in idx
                    ]
                    await store.put_many(batch)
                    counts["puts"] += len(batch)
                elif r < 0.9:
                    await store.get(key)
                    counts["gets"] += 1
                else:
                    await store.delete(key)
                    counts["deletes"] += 1
            except QuotaExceededError:
                counts["refused"] += 1
            except StorageError:
                counts["errors"] += 1
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
