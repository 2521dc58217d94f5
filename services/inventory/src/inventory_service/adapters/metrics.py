"""Inventory's business metrics, registered on the service instance's own registry."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from omni_common.metrics import PlatformMetrics
from prometheus_client import Counter, Histogram

from inventory_service.domain import AvailabilityUpdate, Shortfall

# From a POS publish to the availability row being written: milliseconds matter.
PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1, 5)


class InventoryMetrics:
    """Stock propagation latency, sell-outs and lost demand."""

    def __init__(self, platform: PlatformMetrics) -> None:
        self.service = platform.service
        registry = platform.registry
        self.stock_to_availability = Histogram(
            "omni_inventory_stock_to_availability_seconds",
            "From the event that changed stock (its ce_time) to its availability being written",
            ["service"],
            buckets=PROPAGATION_BUCKETS,
            registry=registry,
        )
        self.out_of_stock_transitions = Counter(
            "omni_inventory_out_of_stock_transitions",
            "SKU x location rows that went out of stock",
            ["service", "location_id"],
            registry=registry,
        )
        self.lost_demand_units = Counter(
            "omni_inventory_lost_demand_units",
            "Units ordered that could not be reserved",
            ["service"],
            registry=registry,
        )
        self.lost_demand_value = Counter(
            "omni_inventory_lost_demand_value",
            "Estimated revenue of units that could not be reserved",
            ["service", "currency"],
            registry=registry,
        )

    def availability_written(
        self, updates: Iterable[AvailabilityUpdate], caused_at: datetime | None
    ) -> None:
        """Count sell-outs and observe propagation latency of committed availability."""
        now = datetime.now(UTC)
        for update in updates:
            if caused_at is not None:
                self.stock_to_availability.labels(self.service).observe(
                    max((now - caused_at).total_seconds(), 0.0)
                )
            if update.sold_out:
                self.out_of_stock_transitions.labels(self.service, update.level.location_id).inc()

    def told_without_cause(self, updates: Iterable[AvailabilityUpdate]) -> None:
        """Count what a change caused by no event told (no propagation latency to see)."""
        self.availability_written(updates, None)

    def demand_lost(self, shortfalls: Iterable[Shortfall]) -> None:
        """Count units and revenue of a rejected reservation."""
        for shortfall in shortfalls:
            self.lost_demand_units.labels(self.service).inc(shortfall.missing)
            self.lost_demand_value.labels(self.service, shortfall.currency).inc(
                float(shortfall.lost_revenue)
            )
