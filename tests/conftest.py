"""Shared test set-up: hypothesis profiles, vectors, and the real servers tests start."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI runs on 2 cores with real servers: no per-example deadline, bounded example counts.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

#: Under CI a missing server or binary fails the run instead of skipping.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# -- real servers (session scope) ----------------------------------------------------------

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
from servers import (  # noqa: E402
    MotoServer,
    RedisCluster,
    RedisServer,
    start_moto,
    start_or_skip,
    start_redis,
    start_redis_cluster,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A standalone redis-server on 127.0.0.1 (TCP on a free port, plus a unix socket)."""
    server = start_or_skip("redis-server", lambda: start_redis(tmp_path_factory.mktemp("redis")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A 3-node Redis Cluster (primaries only) on 127.0.0.1."""
    cluster = start_or_skip(
        "Redis Cluster", lambda: start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """``moto_server`` (in-memory S3) on 127.0.0.1."""
    server = start_or_skip("moto_server", lambda: start_moto(tmp_path_factory.mktemp("moto")))
    try:
        yield server
    finally:
        server.stop()
