"""What inventory consumes and which timers it keeps: one handler per kind of event.

Each handler has the runtime's shape (see ``omni_common.handlers``): the events of its
types that arrived together, the transaction, and the dependencies it names. Domain
refusals (an unknown location, an impossible adjustment) are dead-lettered with their
reason by the runtime; anything else is retried.
"""

from __future__ import annotations

from omni_common.handlers import Clock, Due, Lot, Subscription, only_when
from omni_common.service import Tx
from omni_contracts import (
    INVENTORY_ADJUSTMENTS,
    ORDER_LIFECYCLE,
    STORE_SALES,
    Event,
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

from inventory_service.adapters.metrics import InventoryMetrics
from inventory_service.adapters.repository import InventoryRepository
from inventory_service.service import handlers
from inventory_service.service.handlers import RESERVATION_EXPIRY, Inventory
from inventory_service.service.stock import Outcome, StockSession


def _observe(tx: Tx, metrics: InventoryMetrics, outcome: Outcome, lot: Lot[Event]) -> None:
    # A lot's changes are timed from its oldest event.
    caused_at = min(envelope.time for _, envelope in lot)

    def count() -> None:  # committed: now it is true
        metrics.availability_written(outcome.updates, caused_at)
        metrics.demand_lost(outcome.shortfalls)

    tx.after_commit(count)


async def sales_recorded(
    sales: Lot[SaleRecorded], tx: Tx, inventory: Inventory, metrics: InventoryMetrics
) -> None:
    """Till sales lower on-hand at their stores."""
    _observe(tx, metrics, await handlers.record_sales(inventory, tx, sales), sales)


async def stock_adjusted(
    adjustments: Lot[StockAdjusted], tx: Tx, inventory: Inventory, metrics: InventoryMetrics
) -> None:
    """A receipt, count, damage or transfer leg changes on-hand at its location."""
    for adjustment, envelope in adjustments:
        outcome = await handlers.adjust_stock(inventory, tx, adjustment, envelope)
        _observe(tx, metrics, outcome, [(adjustment, envelope)])


async def orders_placed(
    orders: Lot[OrderPlaced],
    tx: Tx,
    inventory: Inventory,
    metrics: InventoryMetrics,
    clock: Clock,
) -> None:
    """Placed orders get their stock reserved (or rejected)."""
    _observe(tx, metrics, await handlers.reserve(inventory, tx, orders, now=clock()), orders)


async def orders_confirmed(orders: Lot[OrderConfirmed], tx: Tx, inventory: Inventory) -> None:
    """Confirmed orders' reservations hold until fulfilment or cancellation."""
    await handlers.confirm(inventory, tx, [order.order_id for order, _ in orders])


async def orders_ended(
    orders: Lot[OrderCancelled | OrderRejected],
    tx: Tx,
    inventory: Inventory,
    metrics: InventoryMetrics,
) -> None:
    """A cancelled or rejected order's held units (if any were held) are released."""
    for order, envelope in orders:
        why = order.ce_type.rsplit(".", 1)[-1]
        reason = handlers.release_reason(f"order_{why}", order.reason)
        outcome = await handlers.release_reservation(
            inventory, tx, order.order_id, reason, envelope
        )
        _observe(tx, metrics, outcome, [(order, envelope)])


async def orders_fulfilled(
    orders: Lot[OrderPickedUp | OrderShipped],
    tx: Tx,
    inventory: Inventory,
    metrics: InventoryMetrics,
) -> None:
    """A picked-up or shipped order's held units leave their locations."""
    for order, envelope in orders:
        outcome = await handlers.fulfil_order(inventory, tx, order.order_id, envelope)
        _observe(tx, metrics, outcome, [(order, envelope)])


async def returns_received(
    returns: Lot[OrderReturnReceived], tx: Tx, inventory: Inventory, metrics: InventoryMetrics
) -> None:
    """Resellable returned units go back on hand where they were handed in."""
    for returned, envelope in returns:
        outcome = await handlers.restock_return(inventory, tx, returned, envelope)
        _observe(tx, metrics, outcome, [(returned, envelope)])


async def reservations_expired(due: list[Due], tx: Tx, inventory: Inventory) -> None:
    """Timer: a held reservation's time ran out before its order was confirmed."""
    for timer in due:
        await handlers.expire_reservation(inventory, tx, timer.key)


async def lock_stock(events: Lot[Event], tx: Tx, inventory: Inventory) -> None:
    """Take first, in one sorted sweep each, every lock a lot's handlers will take: the
    expiry timers of confirmed orders, then the stock of every SKU its sales, adjustments
    and placed orders name (read once, for every handler of the lot).

    Handled in a lot, its events would otherwise lock event by event, and two lots of
    different partitions (the same SKU sells in several stores) could deadlock; timers go
    before stock as the expiry timer takes them. The handlers' own locks are then already
    held (advisory locks are re-entrant).
    """
    confirmed = [e.order_id for e, _ in events if isinstance(e, OrderConfirmed)]
    if confirmed:
        await handlers.take_expiry_timers(tx, confirmed)
    skus: set[str] = set()
    locations: set[str] = set()
    for event, _ in events:
        if isinstance(event, SaleRecorded):
            skus.update(line.sku for line in event.lines)
            locations.add(event.location_id)
        elif isinstance(event, StockAdjusted):
            skus.add(event.sku)
            locations.add(event.location_id)
        elif isinstance(event, OrderPlaced):
            skus.update(line.sku for line in event.lines)
            if (pickup := handlers.pickup_location(event)) is not None:
                locations.add(pickup)
    if skus:
        repo = InventoryRepository(tx.conn, inventory.lock_namespace)
        await StockSession.open(tx, repo, skus, locations, inventory.clock)


def joins_lot(event: Event) -> bool:
    """Placed orders name their SKUs and confirmed ones touch no stock: ``lock_stock`` takes
    their locks first. Cancelled, rejected and fulfilled orders read their SKUs from the
    reservation (timer row, reservation row, then stock, as the expiry timer does), so each
    is handled alone."""
    return isinstance(event, OrderPlaced | OrderConfirmed)


def subscriptions() -> list[Subscription]:
    """Every topic inventory consumes, with its handlers."""
    return [
        # Sales and adjustments lock the stock of the SKUs they name, which the partitioning
        # (by store) does not follow: a lot takes all its locks first, in order.
        Subscription(STORE_SALES, {SaleRecorded: sales_recorded}, prepare=lock_stock),
        Subscription(INVENTORY_ADJUSTMENTS, {StockAdjusted: stock_adjusted}, prepare=lock_stock),
        Subscription(
            ORDER_LIFECYCLE,
            {
                # In-store sales (orders born completed) took their stock at the till.
                OrderPlaced: only_when(handlers.needs_reservation, orders_placed),
                OrderConfirmed: orders_confirmed,
                OrderCancelled: orders_ended,
                OrderRejected: orders_ended,
                OrderPickedUp: orders_fulfilled,
                OrderShipped: orders_fulfilled,
                OrderReturnReceived: returns_received,
            },
            together=joins_lot,
            prepare=lock_stock,
        ),
    ]


TIMERS = {RESERVATION_EXPIRY: reservations_expired}
"""Inventory's durable timers, by kind."""
