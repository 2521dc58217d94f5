"""Business metrics of the order service (names are used by dashboards and alerts)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from omni_contracts import OrderStatus
from prometheus_client import CollectorRegistry, Counter, Gauge

from order_service.domain.errors import IllegalTransition

log = logging.getLogger(__name__)


class OrderMetrics:
    """Transitions applied, transitions refused and orders per status, per service."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.service = service
        self.transitions = Counter(
            "omni_order_transitions",
            "Order status changes applied",
            ["service", "to_status", "channel"],
            registry=registry,
        )
        self.illegal_transitions = Counter(
            "omni_order_illegal_transitions",
            "Order status changes refused by the state machine",
            ["service"],
            registry=registry,
        )
        self.by_status = Gauge(
            "omni_orders_by_status",
            "Orders standing in each status",
            ["service", "status"],
            registry=registry,
        )
        self.illegal_transitions.labels(service)  # exported as 0 before the first refusal

    def transitioned(self, to_statuses: Iterable[OrderStatus], channel: str) -> None:
        """Count status changes that were committed."""
        for status in to_statuses:
            self.transitions.labels(self.service, status.value, channel).inc()

    def refused(self, refusal: Exception | None = None) -> None:
        """Count one illegal transition refused (other refusals are not transitions)."""
        if refusal is None or isinstance(refusal, IllegalTransition):
            self.illegal_transitions.labels(self.service).inc()

    def set_counts(self, counts: dict[str, int]) -> None:
        """Set the per-status gauge (statuses with no order read 0)."""
        for status in OrderStatus:
            self.by_status.labels(self.service, status.value).set(counts.get(status.value, 0))

    @contextlib.asynccontextmanager
    async def refreshing(
        self, count: Callable[[], Awaitable[dict[str, int]]], every_s: float
    ) -> AsyncIterator[None]:
        """Refresh the per-status gauge from ``count()`` every ``every_s`` seconds."""

        async def loop() -> None:
            while True:
                try:
                    self.set_counts(await count())
                except asyncio.CancelledError:
                    raise
                except Exception:  # a database blip: the next round will do
                    log.warning("could not refresh omni_orders_by_status", exc_info=True)
                await asyncio.sleep(every_s)

        task = asyncio.create_task(loop(), name="orders-by-status")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
