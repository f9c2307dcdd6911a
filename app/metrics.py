"""Every Prometheus metric of the broker, in one registry per app (names: broker_<noun>_<unit>[_total]).

Message counters are driven by the journal's committed events (one place: every change is one event). Queue depth,
oldest pending age and Redis health are read at scrape time. With several worker processes, prometheus-client's
multiprocess mode sums the counters of all workers (with BROKER_WORKERS > 1, settings.export() names the
directory in PROMETHEUS_MULTIPROC_DIR before the workers start).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from app.models import Event, EventType, QueueStats

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROCESSING_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


@dataclass
class RequestTally:
    """This process's request figures for /stats (the seed's fields)."""

    requests_total: int = 0
    by_route: Tally[str] = field(default_factory=Tally)
    by_status: Tally[int] = field(default_factory=Tally)
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """What a scrape reads from the broker: queue depth per status and Redis health."""

    queues: list[QueueStats]
    redis_up: bool
    now: float


class Metrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        """`multiprocess_dir`: where worker processes write their values (settings.metrics_dir), or None."""
        self.multiprocess_dir = str(multiprocess_dir) if multiprocess_dir else None
        self.tally = RequestTally()
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._queue_children: dict[tuple[str, str], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.published = Counter("broker_messages_published_total", "Messages published", ["queue"], registry=r)
        self.delivered = Counter("broker_messages_delivered_total", "Deliveries handed out", ["queue"], registry=r)
        self.acked = Counter("broker_messages_acked_total", "Messages acknowledged", ["queue"], registry=r)
        self.nacked = Counter("broker_messages_nacked_total", "Deliveries rejected by nack", ["queue"], registry=r)
        self.redelivered = Counter("broker_messages_redelivered_total", "Deliveries of a message delivered before",
                                   ["queue"], registry=r)
        self.failed = Counter("broker_messages_failed_total", "Messages failed or dead-lettered", ["queue"],
                              registry=r)
        self.processing = Histogram("broker_message_processing_seconds", "From delivery to ack", ["queue"],
                                    buckets=PROCESSING_BUCKETS, registry=r)
        self.http_requests = Counter("broker_http_requests_total", "HTTP requests answered",
                                     ["method", "route", "status"], registry=r)
        self.http_duration = Histogram("broker_http_request_duration_seconds", "HTTP request latency",
                                       ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.commit_seconds = Histogram("broker_journal_commit_seconds", "Journal group-commit latency",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("broker_journal_batch_size", "Operations per journal commit",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.sse_clients = Gauge("broker_sse_clients", "Connected SSE clients", registry=r,
                                 multiprocess_mode="livesum")
        if not self.multiprocess_dir:
            ProcessCollector(registry=r)

    # -- inputs -------------------------------------------------------------------------------------------------

    def on_events(self, events: list[Event]) -> None:
        """Count committed message events (a journal listener): one increment per counter and queue per commit."""
        counts: Tally[tuple[str, str | None]] = Tally()
        for event in events:
            kind, queue = event.type, event.queue
            if kind is EventType.MESSAGE_PUBLISHED:
                counts["published", queue] += 1
            elif kind is EventType.MESSAGE_DELIVERED:
                counts["delivered", queue] += 1
                if int(event.data.get("delivery_count", 1)) > 1:
                    counts["redelivered", queue] += 1
            elif kind is EventType.MESSAGE_ACKED:
                counts["acked", queue] += 1
                seconds = event.data.get("processing_seconds")
                if isinstance(seconds, int | float):
                    self._of("processing", queue).observe(seconds)
            elif kind is EventType.MESSAGE_NACKED:
                counts["nacked", queue] += 1
                if event.data.get("status") == "failed":
                    counts["failed", queue] += 1
            elif kind in (EventType.MESSAGE_FAILED, EventType.MESSAGE_DEAD_LETTERED):
                counts["failed", queue] += 1
        for (metric, queue), n in counts.items():
            self._of(metric, queue).inc(n)

    def _of(self, metric: str, queue: str | None) -> Any:
        """A per-queue metric's child, cached: labels() takes a lock and builds a tuple on every call."""
        key = (metric, queue or "")
        child = self._queue_children.get(key)
        if child is None:
            child = self._queue_children[key] = getattr(self, metric).labels(queue or "")
        return child

    def on_commit(self, size: int, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self.batch_size.observe(size)

    def on_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # Label children cached by key: labels() takes a lock and builds a tuple on every call.
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.http_requests.labels(method, route, str(status)),
                        self.http_duration.labels(method, route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        tally = self.tally
        tally.requests_total += 1
        tally.by_route[f"{method} {route}"] += 1
        tally.by_status[status] += 1
        if status >= 500:
            tally.last_error, tally.last_error_at = f"{status} on {method} {route}", time.time()

    # -- output -------------------------------------------------------------------------------------------------

    def render(self, snapshot: Snapshot) -> bytes:
        registry = self.registry
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            ProcessCollector(registry=registry)
        scraped = _ScrapeCollector(snapshot)
        registry.register(scraped)
        try:
            return generate_latest(registry)
        finally:
            registry.unregister(scraped)


class _ScrapeCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("broker_queue_messages", "Messages per queue and status", labels=["queue", "status"])
        age = GaugeMetricFamily("broker_queue_oldest_pending_age_seconds", "Age of the oldest pending message",
                                labels=["queue"])
        for stats in self.snapshot.queues:
            for status, n in stats.counts.items():
                depth.add_metric([stats.queue.name, status], n)
            oldest = stats.oldest_pending_at
            age.add_metric([stats.queue.name], max(0.0, self.snapshot.now - oldest) if oldest is not None else 0.0)
        yield depth
        yield age
        yield GaugeMetricFamily("broker_redis_up", "Whether Redis answers and is in step with the journal",
                                value=1.0 if self.snapshot.redis_up else 0.0)


def clear_multiprocess_dir(directory: Path) -> None:
    """Before starting worker processes: an empty directory for their metric files."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
