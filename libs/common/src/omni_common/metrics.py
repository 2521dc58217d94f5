"""Prometheus metrics every service exports (names are used by dashboards and alerts).

One registry per service instance, so several services (or two instances of one) can run
in one process, as the tests do.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class PlatformMetrics:
    """The platform-wide metrics of one service instance (``service`` label on each)."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "omni_http_requests",
            "HTTP requests served",
            ["service", "method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "omni_http_request_duration_seconds",
            "HTTP request duration",
            ["service", "method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events_handled = Counter(
            "omni_events_handled",
            "Kafka events handled, by outcome",
            ["service", "topic", "ce_type", "outcome"],
            registry=r,
        )
        self.event_handling = Histogram(
            "omni_event_handling_seconds",
            "Time from taking an event (or a lot handled together) to its commit",
            ["service", "topic"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_rewinds = Counter(
            "omni_consumer_rewinds",
            "Times a partition rewound to an event it could neither handle nor dead-letter",
            ["service", "topic"],
            registry=r,
        )
        self.handler_retries = Counter(
            "omni_handler_retries",
            "Retries of transiently failing handlers",
            ["service", "topic"],
            registry=r,
        )
        self.infrastructure_waits = Counter(
            "omni_infrastructure_waits",
            "Times a partition held its message until the database or broker answered again",
            ["service", "topic"],
            registry=r,
        )
        self.partitions_paused = Counter(
            "omni_consumer_partition_pauses",
            "Times a partition was paused because its worker's queue was full",
            ["service", "topic"],
            registry=r,
        )
        self.dlq_messages = Counter(
            "omni_dlq_messages",
            "Messages sent to a dead-letter topic",
            ["service", "topic", "reason"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "omni_consumer_lag",
            "Messages not yet consumed (high watermark - position)",
            ["service", "group", "topic", "partition"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "omni_outbox_backlog",
            "Outbox rows not yet published",
            ["service"],
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "omni_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row",
            ["service"],
            registry=r,
        )
        self.outbox_published = Counter(
            "omni_outbox_published",
            "Outbox rows published to Kafka",
            ["service", "topic"],
            registry=r,
        )
        self.outbox_parked = Gauge(
            "omni_outbox_parked",
            "Outbox rows parked because the broker refused them for good (too large, invalid)",
            ["service"],
            registry=r,
        )
        self.outbox_parked_rows = Counter(
            "omni_outbox_parked_rows",
            "Outbox rows parked, by topic",
            ["service", "topic"],
            registry=r,
        )
        self.batch_size = Histogram(
            "omni_consumer_batch_size",
            "Events of one topic handled together in one transaction (a lot)",
            ["service", "topic"],
            buckets=(2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batches_split = Counter(
            "omni_consumer_batches_split",
            "Runs of events that failed together and were handled one by one instead",
            ["service", "topic"],
            registry=r,
        )
        self.timers_failed = Counter(
            "omni_timer_failures",
            "Durable timers whose handler failed: retried later, or dead after the last try",
            ["service", "kind", "outcome"],
            registry=r,
        )
        self.ready = Gauge("omni_ready", "1 when the service is ready", ["service"], registry=r)
        for gauge in (self.outbox_backlog, self.outbox_oldest_age, self.outbox_parked, self.ready):
            gauge.labels(service).set(0)
