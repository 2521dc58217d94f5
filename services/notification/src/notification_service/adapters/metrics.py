"""Notification's business metrics, registered on the service instance's own registry."""

from __future__ import annotations

from omni_common.metrics import PlatformMetrics
from prometheus_client import Counter, Histogram

DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NotificationMetrics:
    """Outcomes per kind and channel, provider latency and errors, removed subscriptions."""

    def __init__(self, platform: PlatformMetrics) -> None:
        self.service = platform.service
        registry = platform.registry
        self.outcomes = Counter(
            "omni_notification_outcomes",
            "Notifications decided or delivered, by outcome (sent, failed, suppressed, deferred)",
            ["service", "kind", "outcome", "reason"],
            registry=registry,
        )
        self.provider_seconds = Histogram(
            "omni_notification_provider_seconds",
            "Time of one provider call (SMTP, Web Push, FCM), retries included",
            ["service", "channel"],
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )
        self.provider_errors = Counter(
            "omni_notification_provider_errors",
            "Provider calls that failed, by error class",
            ["service", "channel", "error"],
            registry=registry,
        )
        self.addresses_removed = Counter(
            "omni_notification_push_addresses_removed",
            "Push subscriptions and app tokens removed because the push service said gone",
            ["service"],
            registry=registry,
        )

    def outcome(self, kind: str, outcome: str, reason: str | None = None) -> None:
        """Count one committed outcome."""
        self.outcomes.labels(self.service, kind, outcome, reason or "").inc()
