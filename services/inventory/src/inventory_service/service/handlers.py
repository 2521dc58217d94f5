"""Inventory's use cases: each runs inside one transaction the caller opened.

Every function takes the transaction (``Tx``: a connection plus the outbox), the event or
request, and its collaborators; none commits or publishes by itself. They return an
:class:`~inventory_service.service.stock.Outcome` for the caller to observe once committed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from omni_common.handlers import Clock
from omni_common.service import Tx
from omni_common.timers import cancel_timer, cancel_timers, set_timers
from omni_contracts import (
    AdjustmentKind,
    Allocation,
    AvailabilityCause,
    FulfillmentType,
    OrderPlaced,
    OrderReturnReceived,
    OrderStatus,
    ReservationConfirmed,
    ReservationRejected,
    ReservationReleased,
    SaleRecorded,
    Shortage,
    StockAdjusted,
    utcnow,
)
from omni_contracts.base import MAX_IDENTIFIER
from omni_contracts.envelope import Envelope

from inventory_service.adapters.repository import InventoryRepository, LostDemand, NewReservation
from inventory_service.domain import (
    OrderLine,
    ReservationPlan,
    StockLevel,
    apply_adjustment,
    apply_sale,
    fulfil,
    hold,
    merge_lines,
    plan_delivery,
    plan_pickup,
    release,
    restock,
)
from inventory_service.service.stock import Outcome, StockSession

log = logging.getLogger(__name__)

RESERVATION_EXPIRY = "reservation-expiry"
"""Timer kind: a held reservation lapses unless its order is confirmed first."""


@dataclass(frozen=True)
class Inventory:
    """What every use case needs besides the transaction: the lock namespace and policy."""

    lock_namespace: str = "inventory"
    reservation_ttl: timedelta = timedelta(minutes=15)
    clock: Clock = utcnow
    # SKUs told per transaction of a location's policy change (service.locations).
    policy_batch: int = 500

    def repo(self, tx: Tx) -> InventoryRepository:
        """The repository on ``tx``'s connection."""
        return InventoryRepository(tx.conn, self.lock_namespace)


# -- the till and the stock room --------------------------------------------------------------


async def record_sales(
    inv: Inventory, tx: Tx, sales: Sequence[tuple[SaleRecorded, Envelope | None]]
) -> Outcome:
    """Take till sales' units off the shelf at their stores, each told as its own change.

    Never refused: a sale beyond the recorded stock floors it and records a discrepancy
    asking for a recount. Raises :class:`UnknownLocation` for a store inventory does not
    know. A sale sent again (under a fresh ``ce_id``) has no second effect.
    """
    repo = inv.repo(tx)
    merged = [
        (sale, e, merge_lines(OrderLine(ln.sku, ln.qty) for ln in sale.lines)) for sale, e in sales
    ]
    stock = await StockSession.open(
        tx,
        repo,
        {line.sku for _, _, lines in merged for line in lines},
        {sale.location_id for sale, _, _ in merged},
        inv.clock,
    )
    for sale, _, _ in merged:
        stock.location(sale.location_id)
    # Read under the SKU locks: a count committed meanwhile is seen.
    fresh, counted = await repo.first_sales(
        [sale.sale_id for sale, _, _ in merged],
        [(sale.location_id, ln.sku, sale.occurred_at) for sale, _, lines in merged for ln in lines],
    )
    todo: list[tuple[SaleRecorded, Envelope | None, list[OrderLine]]] = []
    for sale, envelope, lines in merged:
        if sale.sale_id not in fresh:
            # The till sent it again under a fresh ce_id: one sale, one effect.
            log.info("sale %s was applied before; ignored", sale.sale_id)
            continue
        fresh.discard(sale.sale_id)  # the same sale twice in one lot: once
        todo.append((sale, envelope, lines))
    for sale, envelope, lines in todo:
        for line in lines:
            if (sale.location_id, line.sku, sale.occurred_at) in counted:
                # Counted after this sale was made: the count already left its units out.
                log.info("sale %s of %s predates its count; not subtracted", sale.sale_id, line.sku)
                continue
            level = stock.level(line.sku, sale.location_id)
            result = apply_sale(level, line.qty)
            if result.shortfall:
                log.warning(
                    "sale %s sold %d of %s at %s with %d available: recount needed",
                    sale.sale_id,
                    line.qty,
                    line.sku,
                    sale.location_id,
                    level.available,
                )
                await repo.record_discrepancy(
                    sku=line.sku,
                    location_id=sale.location_id,
                    sale_id=sale.sale_id,
                    sold=line.qty,
                    available=level.available,
                    shortfall=result.shortfall,
                )
            stock.set(result.level)
        stock.tell(AvailabilityCause.SALE, envelope)
    return Outcome(await stock.commit())


async def adjust_stock(
    inv: Inventory, tx: Tx, adjustment: StockAdjusted, envelope: Envelope | None = None
) -> Outcome:
    """Apply a receipt, count, damage or transfer leg at one location.

    Raises :class:`UnknownLocation` or
    :class:`~inventory_service.domain.ImpossibleAdjustment` (nothing changes then).
    """
    repo = inv.repo(tx)
    if not await repo.first_application("adjustment", adjustment.adjustment_id):
        log.info("adjustment %s was applied before; ignored", adjustment.adjustment_id)
        return Outcome()
    stock = await StockSession.open(tx, repo, [adjustment.sku], [adjustment.location_id], inv.clock)
    stock.location(adjustment.location_id)
    sku, location_id, at = adjustment.sku, adjustment.location_id, adjustment.occurred_at
    if adjustment.kind is AdjustmentKind.COUNT:
        if not await repo.record_count(sku, location_id, at):
            log.info("count %s is older than the last count; ignored", adjustment.adjustment_id)
            return Outcome()
    elif await repo.counted_since(location_id, [sku], at):
        # A movement made before the last count is already in that count.
        log.info("adjustment %s predates its count; ignored", adjustment.adjustment_id)
        return Outcome()
    level = stock.level(adjustment.sku, adjustment.location_id)
    stock.set(
        apply_adjustment(level, adjustment.kind, delta=adjustment.delta, counted=adjustment.counted)
    )
    if adjustment.kind is AdjustmentKind.COUNT:
        # The shelf was counted: earlier till discrepancies are settled by it.
        await repo.resolve_discrepancies(
            adjustment.sku, adjustment.location_id, by=adjustment.adjustment_id
        )
    return Outcome(await stock.commit(AvailabilityCause.ADJUSTMENT, envelope))


# -- reservations ----------------------------------------------------------------------------


def _allocations(plan: ReservationPlan) -> list[Allocation]:
    return [Allocation(sku=h.sku, location_id=h.location_id, qty=h.qty) for h in plan.holds]


def needs_reservation(order: OrderPlaced) -> bool:
    """Whether a placed order asks inventory for stock: in-store sales (orders born
    completed) took theirs at the till."""
    return order.status is not OrderStatus.COMPLETED


async def reserve(
    inv: Inventory,
    tx: Tx,
    orders: Sequence[tuple[OrderPlaced, Envelope | None]],
    *,
    now: datetime,
) -> Outcome:
    """Reserve every line of each placed order, or nothing, and say which.

    Pickup orders reserve at the chosen store only; delivery orders at shipping locations
    (see :func:`~inventory_service.domain.plan_delivery`). Orders are planned one after the
    other against the stock the ones before them left, read once for all of them. A
    confirmed reservation expires after the TTL unless the order is confirmed; a rejection
    records the lost demand. In-store sales (orders born completed) took their stock at the
    till: nothing to do.
    """
    repo = inv.repo(tx)
    wanted = [(o, e) for o, e in orders if needs_reservation(o)]
    reserved = await repo.reserved([o.order_id for o, _ in wanted])
    todo: list[tuple[OrderPlaced, Envelope | None]] = []
    for order, envelope in wanted:
        if order.order_id in reserved:
            log.info("order %s already has a reservation; not reserving twice", order.order_id)
            continue
        reserved.add(order.order_id)
        todo.append((order, envelope))
    if not todo:
        return Outcome()
    stock = await StockSession.open(
        tx,
        repo,
        {line.sku for order, _ in todo for line in order.lines},
        {p for order, _ in todo if (p := pickup_location(order)) is not None},
        inv.clock,
    )
    expires_at = now + inv.reservation_ttl
    added: list[NewReservation] = []
    lost: list[LostDemand] = []
    timers: list[tuple[str, datetime, None, dict[str, str] | None]] = []
    outcome = Outcome()
    for order, envelope in todo:
        lines = [
            OrderLine(line.sku, line.qty, line.unit_price.amount, line.unit_price.currency)
            for line in order.lines
        ]
        pickup_id = pickup_location(order)
        refusal: str | None = None
        plan = ReservationPlan()
        if pickup_id is not None:
            store = stock.locations.get(pickup_id)
            if store is None:
                refusal = "unknown_pickup_location"
            elif not store.offers_pickup:
                refusal = "pickup_not_offered"
            else:
                levels = {line.sku: stock.level(line.sku, pickup_id) for line in lines}
                plan = plan_pickup(lines, store, levels)
        else:
            plan = plan_delivery(lines, stock.locations, stock.levels(ln.sku for ln in lines))
        confirmed = refusal is None and plan.confirmed
        reason = None if confirmed else refusal or "out_of_stock"
        added.append(
            NewReservation(
                order_id=order.order_id,
                state="held" if confirmed else "rejected",
                fulfillment=str(order.fulfillment.type),
                pickup_location_id=pickup_id,
                channel=str(order.channel),
                expires_at=expires_at if confirmed else None,
                holds=tuple(plan.holds) if confirmed else (),
                reason=reason,
                correlation_id=envelope.correlation_id if envelope else None,
            )
        )
        if not confirmed:
            assert reason is not None
            shortages = [
                Shortage(sku=s.sku, requested=s.requested, available=s.available)
                for s in plan.shortfalls
            ]
            await tx.emit(
                ReservationRejected(order_id=order.order_id, reason=reason, shortages=shortages),
                caused_by=envelope,
            )
            if plan.shortfalls:
                lost.append(
                    LostDemand(
                        order_id=order.order_id,
                        fulfillment=str(order.fulfillment.type),
                        location_id=pickup_id,
                        channel=str(order.channel),
                        shortfalls=tuple(plan.shortfalls),
                    )
                )
                outcome.shortfalls.extend(plan.shortfalls)
            continue
        for h in plan.holds:
            location = stock.location(h.location_id)
            # The write checks the plan's promise again: the safety stock stays available.
            stock.set(hold(stock.level(h.sku, h.location_id), h.qty), keep=location.safety_stock)
        timers.append((order.order_id, expires_at, None, tx.trace_of(envelope)))
        await tx.emit(
            ReservationConfirmed(
                order_id=order.order_id, allocations=_allocations(plan), expires_at=expires_at
            ),
            caused_by=envelope,
        )
        stock.tell(AvailabilityCause.RESERVATION, envelope)
    await repo.add_reservations(added)
    await repo.record_lost_demand(lost)
    await set_timers(tx.conn, RESERVATION_EXPIRY, timers)
    outcome.updates = await stock.commit()
    return outcome


def pickup_location(order: OrderPlaced) -> str | None:
    """The store a pickup order is to be collected at (None: a delivery)."""
    fulfillment = order.fulfillment
    return fulfillment.location_id if fulfillment.type is FulfillmentType.PICKUP else None


_TAKEN_TIMERS = "inventory.expiry-timers-taken"


async def take_expiry_timers(tx: Tx, order_ids: Sequence[str]) -> None:
    """Cancel these orders' expiry timers (their rows locked in key order), once per
    transaction: a lot's ``prepare`` takes them before any stock."""
    taken: set[str] = tx.shared.setdefault(_TAKEN_TIMERS, set())
    todo = [order_id for order_id in order_ids if order_id not in taken]
    await cancel_timers(tx.conn, RESERVATION_EXPIRY, todo)
    taken.update(todo)


async def confirm(inv: Inventory, tx: Tx, order_ids: Sequence[str]) -> Outcome:
    """The orders were confirmed: their held units stay held until fulfilment or
    cancellation."""
    # Timer rows first, reservation rows second: the lock order of the expiry timer.
    await take_expiry_timers(tx, order_ids)
    repo = inv.repo(tx)
    reservations = await repo.reservations(order_ids)
    held = []
    for order_id in order_ids:
        reservation = reservations.get(order_id)
        if reservation is None or reservation.state != "held":
            log.warning(
                "order %s confirmed but its reservation is %s",
                order_id,
                reservation.state if reservation else "missing",
            )
            continue
        held.append(order_id)
    await repo.set_reservation_states(held, "confirmed")
    return Outcome()


def release_reason(why: str, detail: str) -> str:
    """A release's reason: why, and the order's own words as far as the field holds them
    (an order cancelled with the longest reason allowed must still release its stock)."""
    return f"{why}: {detail}"[:MAX_IDENTIFIER]


async def release_reservation(
    inv: Inventory, tx: Tx, order_id: str, reason: str, envelope: Envelope | None = None
) -> Outcome:
    """Give back an order's held units (cancelled, rejected or expired) and say so."""
    await cancel_timer(tx.conn, RESERVATION_EXPIRY, order_id)
    repo = inv.repo(tx)
    reservation = await repo.reservation(order_id)
    if reservation is None or reservation.state not in ("held", "confirmed"):
        return Outcome()
    stock = await StockSession.open(tx, repo, (h.sku for h in reservation.holds), (), inv.clock)
    for h in reservation.holds:
        stock.set(release(stock.level(h.sku, h.location_id), h.qty))
    await repo.set_reservation_state(order_id, "released", reason)
    # Released by a timer (no causing event): still part of the order's journey.
    correlation_id = None if envelope else reservation.correlation_id
    await tx.emit(
        ReservationReleased(
            order_id=order_id,
            reason=reason,
            allocations=[
                Allocation(sku=h.sku, location_id=h.location_id, qty=h.qty)
                for h in reservation.holds
            ],
        ),
        caused_by=envelope,
        correlation_id=correlation_id,
    )
    return Outcome(
        await stock.commit(AvailabilityCause.RELEASE, envelope, correlation_id=correlation_id)
    )


async def expire_reservation(inv: Inventory, tx: Tx, order_id: str) -> Outcome:
    """A held reservation's time ran out before its order was confirmed: release it."""
    repo = inv.repo(tx)
    reservation = await repo.reservation(order_id)
    if reservation is None or reservation.state != "held":
        return Outcome()
    log.info("reservation of order %s expired", order_id)
    return await release_reservation(inv, tx, order_id, "expired")


async def fulfil_order(
    inv: Inventory, tx: Tx, order_id: str, envelope: Envelope | None = None
) -> Outcome:
    """The order was picked up or shipped: its held units left their locations."""
    await cancel_timer(tx.conn, RESERVATION_EXPIRY, order_id)
    repo = inv.repo(tx)
    reservation = await repo.reservation(order_id)
    if reservation is None or reservation.state in ("fulfilled", "rejected"):
        log.warning(
            "order %s fulfilled but its reservation is %s",
            order_id,
            reservation.state if reservation else "missing",
        )
        return Outcome()
    stock = await StockSession.open(tx, repo, (h.sku for h in reservation.holds), (), inv.clock)
    for h in reservation.holds:
        level = stock.level(h.sku, h.location_id)
        if reservation.state == "released":
            # The hold lapsed but the goods left anyway: take them like a till sale.
            result = apply_sale(level, h.qty)
            if result.shortfall:
                await repo.record_discrepancy(
                    sku=h.sku,
                    location_id=h.location_id,
                    sale_id=f"order:{order_id}",
                    sold=h.qty,
                    available=level.available,
                    shortfall=result.shortfall,
                )
            stock.set(result.level)
        else:
            stock.set(fulfil(level, h.qty))
    await repo.set_reservation_state(order_id, "fulfilled")
    return Outcome(await stock.commit(AvailabilityCause.FULFILLMENT, envelope))


# -- returns ---------------------------------------------------------------------------------


async def restock_return(
    inv: Inventory, tx: Tx, returned: OrderReturnReceived, envelope: Envelope | None = None
) -> Outcome:
    """Put the resellable units of a return back on hand where they were handed in.

    Once per ``return_id``. Raises :class:`UnknownLocation` for an unknown location.
    """
    repo = inv.repo(tx)
    resellable = [line for line in returned.lines if line.resellable]
    stock = await StockSession.open(
        tx, repo, (line.sku for line in resellable), [returned.location_id], inv.clock
    )
    stock.location(returned.location_id)
    if not await repo.first_restock(returned.return_id, returned.order_id, returned.location_id):
        return Outcome()
    for line in resellable:
        stock.set(restock(stock.level(line.sku, returned.location_id), line.qty))
    return Outcome(await stock.commit(AvailabilityCause.RETURN, envelope))


async def seed_stock(inv: Inventory, tx: Tx, levels: Sequence[StockLevel]) -> Outcome:
    """Set the initial on-hand of rows that do not exist yet (existing stock is kept)."""
    repo = inv.repo(tx)
    stock = await StockSession.open(
        tx, repo, (lvl.sku for lvl in levels), (lvl.location_id for lvl in levels), inv.clock
    )
    for level in levels:
        stock.location(level.location_id)
        if not stock.exists(level.sku, level.location_id):
            stock.set(StockLevel(level.sku, level.location_id, on_hand=level.on_hand))
    return Outcome(await stock.commit(AvailabilityCause.ADJUSTMENT))
