"""Prometheus metrics of a store (DESIGN section 8).

Each :class:`StoreMetrics` has its own :class:`prometheus_client.CollectorRegistry`, so
several stores in one process (tests, an engine with two models) never collide. Usage,
quota and eviction gauges are read from the accounting's snapshot at scrape time rather
than updated on every operation (a shared accounting's as of its last refresh).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from flexkv_store.quota import Snapshot

__all__ = ["CONTENT_TYPE", "StoreMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


def _salt_label(salt: str) -> str:
    return salt or "_default"


class _QuotaCollector(Collector):
    """Per-salt usage, quota and eviction figures, read from the accounting when scraped."""

    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        usage = GaugeMetricFamily(
            "flexkv_store_usage_bytes", "Payload bytes stored per cache salt", labels=["cache_salt"]
        )
        objects = GaugeMetricFamily(
            "flexkv_store_objects", "Objects stored per cache salt", labels=["cache_salt"]
        )
        quota = GaugeMetricFamily(
            "flexkv_store_quota_bytes",
            "Quota per cache salt in bytes (absent = unlimited)",
            labels=["cache_salt"],
        )
        evictions = CounterMetricFamily(
            "flexkv_store_evictions",
            "Objects evicted per cache salt (quota or capacity)",
            labels=["cache_salt"],
        )
        evicted_bytes = CounterMetricFamily(
            "flexkv_store_evicted_bytes",
            "Payload bytes evicted per cache salt",
            labels=["cache_salt"],
        )
        snap = self._snapshot()
        if snap is not None:
            for report in snap.salts:
                label = [_salt_label(report.salt)]
                usage.add_metric(label, report.used.nbytes)
                objects.add_metric(label, report.used.objects)
                if report.limit is not None:
                    quota.add_metric(label, report.limit)
                evictions.add_metric(label, report.evicted.objects)
                evicted_bytes.add_metric(label, report.evicted.nbytes)
        yield from (usage, objects, quota, evictions, evicted_bytes)


class _CorruptCollector(Collector):
    """Objects each backend found corrupt (and served as misses), from its own counter."""

    def __init__(self, backends: Callable[[], list[tuple[str, object]]]) -> None:
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        corrupt = CounterMetricFamily(
            "flexkv_store_corrupt_objects",
            "Objects that failed their header or checksum check and were treated as misses",
            labels=["backend"],
        )
        for label, adapter in self._backends():
            count = getattr(adapter, "corrupt_objects", None)
            if isinstance(count, int):
                corrupt.add_metric([label], count)
        yield corrupt


class StoreMetrics:
    """Counters and histograms a store updates, in their own registry."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None] | None = None,
        backends: Callable[[], list[tuple[str, object]]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.operations = Counter(
            "flexkv_store_operations",
            "Store operations by tier/backend, operation and result",
            ["backend", "op", "result"],
            registry=r,
        )
        self.bytes = Counter(
            "flexkv_store_bytes",
            "Payload bytes moved by tier/backend and operation",
            ["backend", "op"],
            registry=r,
        )
        self.latency = Histogram(
            "flexkv_store_operation_seconds",
            "Latency of store operations by tier/backend and operation",
            ["backend", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "flexkv_store_backend_errors",
            "Backend failures (unavailable or storage errors) by backend and operation",
            ["backend", "op", "error"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "flexkv_store_quota_refusals",
            "Puts refused because one object exceeds its salt's quota",
            ["cache_salt"],
            registry=r,
        )
        if snapshot is not None:
            r.register(_QuotaCollector(snapshot))
        if backends is not None:
            r.register(_CorruptCollector(backends))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
