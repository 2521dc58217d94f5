"""Kafka and timer entry points: each event handled in its own transaction with the inbox.

Handlers have the platform's signature ``async def handle(event, envelope)`` once their
dependencies are bound (``functools.partial`` in ``create_app``). Domain refusals become
:class:`~omni_common.kafka.RejectedEvent` (dead-lettered with a reason, never retried);
anything else is a transient failure that the runtime retries.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from omni_common.kafka import EventHandler, Prepare, RejectedEvent
from omni_common.service import ServiceRuntime, Tx
from omni_contracts import (
    OrderCancelled,
    OrderConfirmed,
    OrderPickedUp,
    OrderPlaced,
    OrderRejected,
    OrderReturnReceived,
    OrderShipped,
    SaleRecorded,
    StockAdjusted,
)
from omni_contracts.base import Event
from omni_contracts.envelope import Envelope

from inventory_service.adapters.metrics import InventoryMetrics
from inventory_service.adapters.repository import InventoryRepository
from inventory_service.domain import ImpossibleAdjustment
from inventory_service.service import handlers
from inventory_service.service.handlers import Inventory
from inventory_service.service.stock import Outcome, UnknownLocation

Handler = Callable[..., Awaitable[None]]
"""An entry point before its dependencies are bound: ``(deps, event, envelope)``."""
BoundHandler = EventHandler
"""An entry point with its dependencies bound: ``(event, envelope)``."""


@dataclass(frozen=True)
class Deps:
    """What the entry points need: the runtime, the use cases' context and the metrics."""

    runtime: ServiceRuntime
    inventory: Inventory
    metrics: InventoryMetrics

    def consumer(self, topic: str) -> str:
        """The inbox consumer name for events of ``topic``."""
        return f"{self.runtime.settings.service_name}:{topic}"


@contextlib.asynccontextmanager
async def _refusals() -> AsyncIterator[None]:
    """Turn the domain's refusals into dead-lettered rejections with a clear reason."""
    try:
        yield
    except UnknownLocation as exc:
        raise RejectedEvent("unknown_location", str(exc)) from exc
    except ImpossibleAdjustment as exc:
        raise RejectedEvent(exc.reason, exc.detail) from exc


async def _handle(
    deps: Deps,
    topic: str,
    envelope: Envelope,
    work: Callable[[Tx], Awaitable[Outcome]],
) -> None:
    async with _refusals(), deps.runtime.handling(deps.consumer(topic), envelope) as tx:
        if tx is None:
            return  # handled before: no second effect
        outcome = await work(tx)

        def count() -> None:  # committed: now it is true
            deps.metrics.availability_written(outcome.updates, envelope.time)
            deps.metrics.demand_lost(outcome.shortfalls)

        tx.after_commit(count)


async def sale_recorded(deps: Deps, event: SaleRecorded, envelope: Envelope) -> None:
    """A till sale lowers on-hand at its store."""
    await _handle(
        deps,
        event.topic,
        envelope,
        lambda tx: handlers.record_sale(deps.inventory, tx, event, envelope),
    )


async def stock_adjusted(deps: Deps, event: StockAdjusted, envelope: Envelope) -> None:
    """A receipt, count, damage or transfer leg changes on-hand at its location."""
    await _handle(
        deps,
        event.topic,
        envelope,
        lambda tx: handlers.adjust_stock(deps.inventory, tx, event, envelope),
    )


async def order_placed(deps: Deps, event: OrderPlaced, envelope: Envelope) -> None:
    """A placed order gets its stock reserved (or rejected)."""
    await _handle(
        deps,
        event.topic,
        envelope,
        lambda tx: handlers.reserve(deps.inventory, tx, event, envelope),
    )


async def order_confirmed(deps: Deps, event: OrderConfirmed, envelope: Envelope) -> None:
    """A confirmed order's reservation holds until fulfilment or cancellation."""
    await _handle(
        deps, event.topic, envelope, lambda tx: handlers.confirm(deps.inventory, tx, event.order_id)
    )


async def order_cancelled(deps: Deps, event: OrderCancelled, envelope: Envelope) -> None:
    """A cancelled order's held units are released."""
    reason = f"order_cancelled: {event.reason}"
    await _handle(
        deps,
        event.topic,
        envelope,
        lambda tx: handlers.release_reservation(
            deps.inventory, tx, event.order_id, reason, envelope
        ),
    )


async def order_rejected(deps: Deps, event: OrderRejected, envelope: Envelope) -> None:
    """A rejected order's held units (if any were held) are released."""
    reason = f"order_rejected: {event.reason}"
    await _handle(
        deps,
        event.topic,
        envelope,
        lambda tx: handlers.release_reservation(
            deps.inventory, tx, event.order_id, reason, envelope
        ),
    )


async def order_fulfilled(
    deps: Deps, event: OrderPickedUp | OrderShipped, envelope: Envelope
) -> None:
    """A picked-up or shipped order's held units leave their locations."""
    await _handle(
        deps,
        event.topic,
        envelope,
        lambda tx: handlers.fulfil_order(deps.inventory, tx, event.order_id, envelope),
    )


async def return_received(deps: Deps, event: OrderReturnReceived, envelope: Envelope) -> None:
    """Resellable returned units go back on hand where they were handed in."""
    await _handle(
        deps,
        event.topic,
        envelope,
        lambda tx: handlers.restock_return(deps.inventory, tx, event, envelope),
    )


async def reservation_expired(deps: Deps, tx: Tx, order_id: str, _payload: dict[str, Any]) -> None:
    """Timer: a held reservation's time ran out (runs in the timer's transaction)."""
    await handlers.expire_reservation(deps.inventory, tx, order_id)


def stock_locks(deps: Deps) -> Prepare:
    """Lock, in one sorted sweep, the stock of every SKU a run of sales, adjustments or
    placed orders names.

    Handled together, a run's events would otherwise lock SKUs event by event, and two runs
    of different partitions (the same SKU sells in several stores) could deadlock. The
    handlers' own locks are then already held (advisory locks are re-entrant).
    """

    async def prepare(conn: asyncpg.Connection, events: Sequence[Event]) -> None:
        skus: set[str] = set()
        for event in events:
            if isinstance(event, SaleRecorded):
                skus.update(line.sku for line in event.lines)
            elif isinstance(event, StockAdjusted):
                skus.add(event.sku)
            elif isinstance(event, OrderPlaced) and handlers.needs_reservation(event):
                skus.update(line.sku for line in event.lines)
        if skus:
            await InventoryRepository(conn, deps.inventory.lock_namespace).lock_and_read(skus)

    return prepare


def joins_lot(event: Event) -> bool:
    """Placed orders name their SKUs, which ``stock_locks`` takes first; the other order
    events read theirs from the reservation (timer row, reservation row, then stock, as the
    expiry timer does), so each is handled alone."""
    return isinstance(event, OrderPlaced)
