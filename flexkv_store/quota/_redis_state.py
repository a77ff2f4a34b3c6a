"""Quotas persisted in a Redis hash, for stores whose first backend is Redis.

Several engine workers sharing one Redis then share their quota settings too. The hash is
named ``{key_prefix}flexkv-store:quotas``; it holds no ``@``, so it can never be mistaken
for a stored object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexkv_store.backends.base import L2Adapter
from flexkv_store.errors import BackendUnavailableError, ConfigError, StorageError
from flexkv_store.keyformat import check_cache_salt

__all__ = ["RedisQuotaState"]

HASH_NAME = "flexkv-store:quotas"


class RedisQuotaState:
    """Explicit quotas as fields of one Redis hash (salt -> bytes)."""

    def __init__(self, adapter: L2Adapter) -> None:
        client = getattr(adapter, "client", None)
        if client is None:
            raise ConfigError("the Redis quota state needs the redis adapter's client")
        self._client: Any = client
        prefix = getattr(getattr(adapter, "config", None), "key_prefix", "")
        self.name = f"{prefix}{HASH_NAME}".encode()

    async def load(self) -> dict[str, int]:
        import redis.exceptions

        try:
            raw = await self._client.hgetall(self.name)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise BackendUnavailableError(f"redis quota state: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise StorageError(f"redis quota state: {exc}") from exc
        out: dict[str, int] = {}
        for field, value in raw.items():
            salt = field.decode("utf-8") if isinstance(field, bytes) else str(field)
            try:
                out[check_cache_salt(salt)] = int(value)
            except ValueError as exc:
                raise ConfigError(f"redis quota state: bad entry {salt!r}: {exc}") from None
        return out

    async def save(self, quotas: Mapping[str, int]) -> None:
        import redis.exceptions

        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self.name)
                if quotas:
                    pipe.hset(self.name, mapping={k.encode(): v for k, v in quotas.items()})
                await pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise BackendUnavailableError(f"redis quota state: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise StorageError(f"redis quota state: {exc}") from exc

    def describe(self) -> str:
        return f"redis-hash:{self.name.decode()}"
