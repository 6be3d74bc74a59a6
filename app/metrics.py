"""Prometheus metrics of one API process, with the names of DESIGN.md's public contract.

Update counts and queue depth are read from the ledger at scrape time, so every replica reports
the same derived truth instead of counters that drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.ledger import Ledger

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
UPDATE_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class LedgerCollector(Collector):
    """Update counts, queue depth and the last job's outcome, read from the stores at scrape time."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        counts = self.ledger.counts()
        # Counted from durable state; a gauge because a promote can move sets between statuses.
        updates = GaugeMetricFamily("warmtune_updates_total", "Update sets by status.", labels=["status"])
        for status, n in counts.items():
            updates.add_metric([status], n)
        yield updates
        yield GaugeMetricFamily(
            "warmtune_update_queue_depth", "Update sets stored and waiting for a job.", value=counts["queued"]
        )
        yield GaugeMetricFamily(
            "warmtune_worker_busy", "1 while an update job is training.", value=int(counts["running"] > 0)
        )
        last = self.ledger.last_step()
        if last is not None:
            info = GaugeMetricFamily("warmtune_last_job", "Outcome of the last update step (1).", labels=["status"])
            info.add_metric([last.status], 1)
            yield info
            yield GaugeMetricFamily(
                "warmtune_last_job_timestamp_seconds", "When the last update step ended.", value=last.created_at
            )


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
        self.swap_seconds = Histogram(
            "warmtune_swap_seconds", "Load and warm-up of a new version.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.predict_requests = Counter(
            "warmtune_predict_requests", "Predict requests by HTTP status and answering version.",
            ["status", "version"], registry=r,
        )
        self.predict_latency = Histogram(
            "warmtune_predict_latency_seconds", "Predict request latency.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.predict_batch = Histogram(
            "warmtune_predict_batch_size", "Images per forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.update_duration = Histogram(
            "warmtune_update_duration_seconds", "Label to serve: from storing an update set to serving a version with it.",
            buckets=UPDATE_BUCKETS, registry=r,
        )
        self.holdout_accuracy = Gauge(
            "warmtune_holdout_accuracy", "Holdout accuracy of the served version.", ["scope"], registry=r
        )

    def watch_ledger(self, ledger: Ledger) -> None:
        self.registry.register(LedgerCollector(ledger))

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
