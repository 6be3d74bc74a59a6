"""Prometheus metrics of one API process, with the names of DESIGN.md's public contract.

Update counts and queue depth are read from the stores at scrape time, so every replica reports
the same derived truth instead of counters that drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.stores import Stores

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
UPDATE_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# Old names, still exported for one release so that dashboards and alerts can move over; removed after 0.2.
DEPRECATED = {
    "warmtune_updates": "warmtune_updates_total",
    "warmtune_last_step": "warmtune_last_job",
    "warmtune_last_step_timestamp_seconds": "warmtune_last_job_timestamp_seconds",
}


class StoresCollector(Collector):
    """Update counts, queue depth and the last step's attempt, read from the stores at scrape time."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    def collect(self) -> Iterator[Metric]:
        for metric in self.current():
            yield metric
            if metric.name in DEPRECATED:
                old = Metric(DEPRECATED[metric.name], f"Deprecated: read {metric.name}.", metric.type)
                old.samples = [s._replace(name=old.name) for s in metric.samples]
                yield old

    def current(self) -> Iterator[Metric]:
        counts = self.stores.counts()
        # Counted from durable state; a gauge (no _total) because a promote can move sets between statuses.
        updates = GaugeMetricFamily("warmtune_updates", "Update sets by status.", labels=["status"])
        for status, n in counts.items():
            updates.add_metric([status], n)
        yield updates
        yield GaugeMetricFamily("warmtune_update_queue_depth", "Update sets stored and waiting for a job.", value=counts["queued"])
        yield GaugeMetricFamily("warmtune_worker_busy", "1 while an update job is training.", value=int(counts["running"] > 0))
        last = self.stores.last_step()
        if last is not None:
            info = GaugeMetricFamily("warmtune_last_step", "Status of the last update step (1).", labels=["status"])
            info.add_metric([last.status], 1)
            yield info
            yield GaugeMetricFamily("warmtune_last_step_timestamp_seconds", "When the last update step ended.", value=last.at)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.model_version = Gauge("warmtune_model_version", "Model version this process serves (0: none).", registry=r)
        self.model_classes = Gauge("warmtune_model_classes", "Classes of the served model.", registry=r)
        self.swaps = Counter("warmtune_swaps_total", "Model swaps done by this process.", registry=r)
        self.swap_failures = Counter(
            "warmtune_swap_failures_total", "Model versions that failed to load; the old one kept serving.", registry=r
        )
        self.swap_seconds = Histogram("warmtune_swap_seconds", "Load and warm-up of a new version.", buckets=LATENCY_BUCKETS, registry=r)
        self.predict_requests = Counter(
            "warmtune_predict_requests",
            "Predict requests by HTTP status and answering version.",
            ["status", "version"],
            registry=r,
        )
        self.predict_latency = Histogram(
            "warmtune_predict_latency_seconds", "Predict request latency.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.predict_batch = Histogram("warmtune_predict_batch_size", "Images per forward pass.", buckets=BATCH_BUCKETS, registry=r)
        self.update_duration = Histogram(
            "warmtune_update_duration_seconds",
            "Label to serve: from storing an update set to serving a version with it.",
            buckets=UPDATE_BUCKETS,
            registry=r,
        )
        self.holdout_accuracy = Gauge("warmtune_holdout_accuracy", "Holdout accuracy of the served version.", ["scope"], registry=r)

    def watch_stores(self, stores: Stores) -> None:
        self.registry.register(StoresCollector(stores))

    def served(self, version: int, classes: int, holdout: dict[str, float | None] | None, swap_seconds: float) -> None:
        """Record a swap to a new version."""
        self.swaps.inc()
        self.swap_seconds.observe(swap_seconds)
        self.model_version.set(version)
        self.model_classes.set(classes)
        self.holdout_accuracy.clear()
        for scope, value in (holdout or {}).items():
            if scope in ("old", "new", "all") and value is not None:
                self.holdout_accuracy.labels(scope).set(value)

    def predicted(self, status: int, version: int | None, started: float) -> None:
        self.predict_requests.labels(str(status), str(version) if version is not None else "none").inc()
        self.predict_latency.observe(time.perf_counter() - started)
