"""Customer-profile business metrics, registered on the service instance's own registry."""

from __future__ import annotations

from omni_common.metrics import PlatformMetrics
from prometheus_client import Counter, Histogram

from customer_profile_service.service.context import Outcome

# From a cart's abandonment deadline to its announcement: the timer wheel's lag.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 2, 5, 10, 30, 60)


class ProfileMetrics:
    """Merges, skipped identifiers, abandoned and skipped carts, erasures."""

    def __init__(self, platform: PlatformMetrics) -> None:
        self.service = platform.service
        r = platform.registry
        self.merges = Counter(
            "omni_profile_merges", "Profiles merged into an older one", ["service"], registry=r
        )
        self.identifiers_skipped = Counter(
            "omni_profile_identifiers_skipped",
            "Identifiers presented but not applied (blocked_value, identifier_limit,"
            " shared_device)",
            ["service", "kind", "reason"],
            registry=r,
        )
        self.unmerges = Counter(
            "omni_profile_unmerges", "Merges undone on request", ["service"], registry=r
        )
        self.devices_dropped = Counter(
            "omni_profile_push_devices_dropped",
            "Push devices dropped: beyond PROFILE_MAX_PUSH_DEVICES (oldest) or found gone",
            ["service"],
            registry=r,
        )
        self.snapshots = Counter(
            "omni_profile_snapshots", "Profile snapshots published", ["service"], registry=r
        )
        self.erasures = Counter(
            "omni_profile_erasures", "Shoppers erased on request", ["service"], registry=r
        )
        self.carts_abandoned = Counter(
            "omni_cart_abandoned", "Abandoned carts announced", ["service", "channel"], registry=r
        )
        self.abandonments_skipped = Counter(
            "omni_cart_abandonments_skipped",
            "Cart abandonments not announced, by reason (checked_out, emptied, purchased,"
            " anonymous, already_announced, erased)",
            ["service", "reason"],
            registry=r,
        )
        self.abandonment_lag = Histogram(
            "omni_cart_abandonment_lag_seconds",
            "From a cart's abandonment deadline to its announcement being written",
            ["service"],
            buckets=LAG_BUCKETS,
            registry=r,
        )

    def observe(self, out: Outcome) -> None:
        """Count what a committed use case did."""
        s = self.service
        self.merges.labels(s).inc(out.merges)
        self.unmerges.labels(s).inc(out.unmerges)
        self.devices_dropped.labels(s).inc(out.devices_dropped)
        self.snapshots.labels(s).inc(out.snapshots)
        self.erasures.labels(s).inc(out.erased)
        for kind, reason in out.skipped_identifiers:
            self.identifiers_skipped.labels(s, kind, reason).inc()
        for reason in out.cart_skips:
            self.abandonments_skipped.labels(s, reason).inc()
