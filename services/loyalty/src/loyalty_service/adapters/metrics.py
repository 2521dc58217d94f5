"""Loyalty's business metrics, registered on the service instance's own registry."""

from __future__ import annotations

from omni_common.metrics import PlatformMetrics
from prometheus_client import Counter


class LoyaltyMetrics:
    """Ledger entries and points by kind, refused holds, points that could not be recovered."""

    def __init__(self, platform: PlatformMetrics) -> None:
        self.service = platform.service
        registry = platform.registry
        self.entries = Counter(
            "omni_loyalty_ledger_entries",
            "Ledger entries written, by kind",
            ["service", "kind"],
            registry=registry,
        )
        self.points = Counter(
            "omni_loyalty_points",
            "Points moved by ledger entries (absolute), by kind",
            ["service", "kind"],
            registry=registry,
        )
        self.refusals = Counter(
            "omni_loyalty_holds_refused",
            "Checkout holds refused, by reason",
            ["service", "reason"],
            registry=registry,
        )
        self.unrecovered = Counter(
            "omni_loyalty_points_unrecovered",
            "Points that a return, a late redemption or an unmerge could not take (already spent)",
            ["service", "what"],
            registry=registry,
        )
        self.offers = Counter(
            "omni_loyalty_offers_issued", "Offers issued", ["service"], registry=registry
        )

    def written(self, entries: list[tuple[str, int]]) -> None:
        """Count committed entries (kind, points)."""
        for kind, points in entries:
            self.entries.labels(self.service, kind).inc()
            self.points.labels(self.service, kind).inc(abs(points))
