"""The order service's use cases: one method per thing that can happen to an order.

Each takes the transaction it runs in (``tx``), whoever opened it: the runtime for an event
(``entrypoints/consumers.py``), an HTTP route, or a timer. Domain refusals surface as
:class:`~order_service.domain.errors.OrderError`, which the runtime dead-letters with its
reason and HTTP answers with a client error.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from omni_common.service import ServiceRuntime, Tx
from omni_common.timers import cancel_timer, set_timer
from omni_contracts import (
    CheckoutSubmitted,
    Delivered,
    EtaChanged,
    OrderCancellationRequested,
    OrderStatus,
    PickedUp,
    PointsHeld,
    PointsRefused,
    ReadyForPickup,
    ReservationConfirmed,
    ReservationRejected,
    ReservationReleased,
    ReturnReceived,
    SaleRecorded,
    Shipped,
    utcnow,
)
from omni_contracts.envelope import Envelope

from order_service.adapters.metrics import OrderMetrics
from order_service.adapters.repository import OrderRepository, PageCursor
from order_service.domain.errors import IdempotencyConflict, IllegalTransition, OrderNotFound
from order_service.domain.model import (
    INVENTORY,
    LOYALTY,
    Order,
    fingerprint,
    required_participants,
)
from order_service.settings import OrderSettings

log = logging.getLogger(__name__)

PICKUP_TIMER = "order.pickup_not_collected"
RESERVATION_TIMER = "order.reservation_timeout"
"""Timer kind: a packed pickup order not collected in time (key: order_id)."""
PROMISE_TIMER = "order.delivery_promise"
"""Timer kind: a shipped order's delivery promise (key: order_id)."""


@dataclass(frozen=True)
class Placement:
    """The outcome of placing an order: the order, and whether this request created it."""

    order: Order
    created: bool


def checkout_fingerprint(checkout: CheckoutSubmitted) -> str:
    """The hash that tells a resubmitted checkout from a different one under the same key.

    Only contract fields count, not when it was sent: a retry minutes later is the same.
    """
    fields = set(CheckoutSubmitted.model_fields) - {"checkout_id", "occurred_at"}
    return fingerprint(checkout.model_dump(mode="json", include=fields))


def sale_fingerprint(sale: SaleRecorded) -> str:
    """The hash that tells a re-sent sale from a different one with the same ``sale_id``."""
    return fingerprint(sale.model_dump(mode="json", include=set(SaleRecorded.model_fields)))


class OrderService:
    """Applies checkouts, sales, saga answers, fulfilment, returns and timers to orders."""

    def __init__(
        self,
        settings: OrderSettings,
        metrics: OrderMetrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock

    # -- writing --------------------------------------------------------------------------

    async def load(self, tx: Tx, order_id: str) -> Order:
        """The order, locked until commit; :class:`OrderNotFound` if there is none."""
        order = await OrderRepository(tx.conn).get(order_id)
        if order is None:
            raise OrderNotFound(f"no order {order_id}")
        return order

    async def save(
        self, tx: Tx, order: Order, *, new: bool = False, caused_by: Envelope | None = None
    ) -> None:
        """Persist the order's changes and write its events to the outbox (same transaction).

        Events are caused by the incoming event (if any) and carry the order's journey as
        ``correlation_id``, whether the change came from Kafka, HTTP or a timer; the status
        changes are counted once committed.
        """
        repo = OrderRepository(tx.conn)
        if new:
            await repo.add(order)
        else:
            await repo.save(order)
        for event in order.events:
            await tx.emit(event, caused_by=caused_by, correlation_id=order.correlation_id)
        statuses, channel = list(order.transitions), order.channel.value
        tx.after_commit(lambda: self.metrics.transitioned(statuses, channel))
        order.events.clear()
        order.transitions.clear()
        order.new_returns.clear()
        order.notes.clear()

    # -- placing orders -------------------------------------------------------------------

    async def place_order(
        self, tx: Tx, checkout: CheckoutSubmitted, envelope: Envelope | None = None
    ) -> Placement:
        """Turn a checkout into an order, once per ``checkout_id`` (topic or HTTP alike).

        Raises :class:`IdempotencyConflict` when the ``checkout_id`` came before with a
        different checkout, and :class:`~order_service.domain.errors.InvalidOrder` when it
        cannot be an order.
        """
        key = f"checkout:{checkout.checkout_id}"
        request_hash = checkout_fingerprint(checkout)
        repo = OrderRepository(tx.conn)
        existing = await repo.lock_key(key)
        if existing is not None:
            if existing.request_hash != request_hash:
                raise IdempotencyConflict(
                    f"checkout {checkout.checkout_id} was submitted before with other content"
                )
            order = await repo.get(existing.order_id, for_update=False)
            assert order is not None
            return Placement(order, created=False)
        now = self.clock()
        order = Order.from_checkout(
            checkout,
            order_id=_new_order_id(),
            correlation_id=_journey(envelope),
            participants=required_participants(
                checkout.points_to_redeem, loyalty_in_saga=self.settings.loyalty_in_saga
            ),
            now=now,
        )
        await self.save(tx, order, new=True, caused_by=envelope)
        await repo.remember_key(key, request_hash, order.order_id)
        await set_timer(
            tx.conn, RESERVATION_TIMER, order.order_id, now + self.settings.reservation_timeout
        )
        log.info("order %s placed for checkout %s", order.order_id, checkout.checkout_id)
        return Placement(order, created=True)

    async def record_sale(self, tx: Tx, sale: SaleRecorded, envelope: Envelope) -> None:
        """A till sale becomes an order with channel=store, born completed, once per sale_id."""
        key = f"sale:{sale.sale_id}"
        request_hash = sale_fingerprint(sale)
        repo = OrderRepository(tx.conn)
        existing = await repo.lock_key(key)
        if existing is not None:
            if existing.request_hash != request_hash:
                raise IdempotencyConflict(
                    f"sale {sale.sale_id} was recorded before with other content"
                )
            return  # the till sent it again: one order
        order = Order.from_store_sale(
            sale, order_id=_new_order_id(), correlation_id=_journey(envelope), now=self.clock()
        )
        await self.save(tx, order, new=True, caused_by=envelope)
        await repo.remember_key(key, request_hash, order.order_id)

    # -- the saga and the order's life ---------------------------------------------------

    async def apply(
        self,
        tx: Tx,
        order_id: str,
        envelope: Envelope | None,
        change: Callable[[Order, datetime], bool],
        *,
        cancels_pickup: bool = False,
        always: bool = False,
        settles_saga: bool = False,
    ) -> Order:
        """Load, change, save: the shape of most changes to an order.

        ``change`` returns whether anything happened; ``always`` saves even when no event
        results (e.g. a new ETA that is still on time is worth remembering).
        """
        order = await self.load(tx, order_id)
        changed = change(order, self.clock())
        if cancels_pickup and changed:
            await cancel_timer(tx.conn, PICKUP_TIMER, order.order_id)
        if settles_saga and changed and order.status is not OrderStatus.PLACED:
            await cancel_timer(tx.conn, RESERVATION_TIMER, order.order_id)
        if changed or always:
            await self.save(tx, order, caused_by=envelope)
        return order

    async def reservation_confirmed(
        self, tx: Tx, yes: ReservationConfirmed, envelope: Envelope
    ) -> None:
        """Inventory said yes: confirm once every participant has."""
        await self.apply(
            tx,
            yes.order_id,
            envelope,
            lambda o, now: o.participant_confirmed(INVENTORY, now, allocations=yes.allocations),
            settles_saga=True,
        )

    async def reservation_rejected(
        self, tx: Tx, no: ReservationRejected, envelope: Envelope
    ) -> None:
        """Inventory said no: reject with its shortages."""
        await self.apply(
            tx,
            no.order_id,
            envelope,
            lambda o, now: o.participant_rejected(
                INVENTORY, no.reason, now, shortages=no.shortages
            ),
            settles_saga=True,
        )

    async def reservation_released(
        self, tx: Tx, released: ReservationReleased, envelope: Envelope
    ) -> None:
        """Inventory released the stock: an expiry rejects or cancels the order."""

        def change(order: Order, now: datetime) -> bool:
            changed = order.reservation_released(released.reason, now)
            if changed:
                order.note("reservation_released", released.reason)
            return changed

        await self.apply(
            tx, released.order_id, envelope, change, cancels_pickup=True, settles_saga=True
        )

    async def points_held(self, tx: Tx, held: PointsHeld, envelope: Envelope) -> None:
        """Loyalty held the points: its yes, worth ``value`` against the total."""
        if held.order_id is None:
            return  # not a checkout's hold: nothing for the saga
        value = held.value.amount if held.value is not None else None
        await self.apply(
            tx,
            held.order_id,
            envelope,
            lambda o, now: o.participant_confirmed(LOYALTY, now, points_value=value),
        )

    async def points_refused(self, tx: Tx, refused: PointsRefused, envelope: Envelope) -> None:
        """Loyalty refused (insufficient points, unknown member): reject the order."""
        if refused.order_id is None:
            return
        await self.apply(
            tx,
            refused.order_id,
            envelope,
            lambda o, now: o.participant_rejected(LOYALTY, refused.reason.value, now),
        )

    async def picked_up(self, tx: Tx, pickup: PickedUp, envelope: Envelope) -> None:
        """The shopper collected it."""
        await self.apply(
            tx,
            pickup.order_id,
            envelope,
            lambda o, now: o.picked_up(now, location_id=pickup.location_id),
            cancels_pickup=True,
        )

    async def eta_changed(self, tx: Tx, change: EtaChanged, envelope: Envelope) -> None:
        """A carrier's new ETA: past the promise, announce the delay once per ETA."""
        await self.apply(
            tx,
            change.order_id,
            envelope,
            lambda o, now: o.eta_changed(change.eta, now),
            always=True,
        )

    async def cancel(self, tx: Tx, order_id: str, reason: str) -> Order:
        """Cancel an order (HTTP): raises IllegalTransition once it is fulfilled."""
        try:
            return await self.apply(
                tx, order_id, None, lambda o, now: o.cancel(reason, now), cancels_pickup=True
            )
        except IllegalTransition:
            self.metrics.refused()
            raise

    async def request_cancellation(
        self, tx: Tx, request: OrderCancellationRequested, envelope: Envelope
    ) -> None:
        """Cancel, or (too late to cancel) refuse, count and note it.

        A late request is business as usual (the contract says it is ignored), not a
        poison message: it is kept in the order's history rather than dead-lettered.
        """
        order = await self.load(tx, request.order_id)
        try:
            changed = order.cancel(request.reason, self.clock())
        except IllegalTransition as exc:
            tx.after_commit(self.metrics.refused)
            log.info("cancellation of %s refused: %s", order.order_id, exc)
            order.note(
                "cancellation_refused",
                f"{exc.message}; requested by {request.channel}: {request.reason}",
            )
            changed = True  # the note is worth keeping
        else:
            await cancel_timer(tx.conn, PICKUP_TIMER, order.order_id)
        if changed:
            await self.save(tx, order, caused_by=envelope)

    async def ready_for_pickup(self, tx: Tx, ready: ReadyForPickup, envelope: Envelope) -> None:
        """The store packed it: announce and start the not-collected timer."""
        order = await self.load(tx, ready.order_id)
        if order.ready_for_pickup(
            self.clock(),
            window=self.settings.pickup_window,
            location_id=ready.location_id,
            collect_by=ready.collect_by,
        ):
            assert order.collect_by is not None
            await set_timer(tx.conn, PICKUP_TIMER, order.order_id, order.collect_by)
            await self.save(tx, order, caused_by=envelope)

    async def shipped(self, tx: Tx, shipped: Shipped, envelope: Envelope) -> None:
        """It left with a carrier: watch the delivery promise."""
        order = await self.load(tx, shipped.order_id)
        if order.shipped(
            self.clock(),
            carrier=shipped.carrier,
            tracking_id=shipped.tracking_id,
            promised_by=shipped.promised_by,
        ):
            await set_timer(tx.conn, PROMISE_TIMER, order.order_id, shipped.promised_by)
            await self.save(tx, order, caused_by=envelope)

    async def delivered(self, tx: Tx, delivered: Delivered, envelope: Envelope) -> None:
        """The carrier delivered it: the promise is kept or moot."""
        order = await self.load(tx, delivered.order_id)
        if order.delivered(self.clock()):
            await cancel_timer(tx.conn, PROMISE_TIMER, order.order_id)
            await self.save(tx, order, caused_by=envelope)

    async def receive_return(self, tx: Tx, returned: ReturnReceived, envelope: Envelope) -> None:
        """Goods handed back anywhere: announce where (inventory restocks) and refund them."""
        order = await OrderRepository(tx.conn).get_for_return(returned.order_id)
        if order is None:
            raise OrderNotFound(f"no order {returned.order_id}")
        if order.receive_return(
            return_id=returned.return_id,
            location_id=returned.location_id,
            channel=returned.channel,
            lines=returned.lines,
            now=self.clock(),
        ):
            await cancel_timer(tx.conn, PROMISE_TIMER, order.order_id)
            await self.save(tx, order, caused_by=envelope)

    async def erase_customer(self, tx: Tx, customer_id: str) -> None:
        """A shopper was forgotten: their orders lose addresses and contacts, keep amounts."""
        erased = await OrderRepository(tx.conn).erase_customer(customer_id)
        log.info("erased personal data of %d orders of a customer", erased)

    # -- timers ---------------------------------------------------------------------------

    async def pickup_not_collected(self, tx: Tx, order_id: str) -> None:
        """A packed pickup order was not collected in time: cancel it (stock goes back)."""
        order = await OrderRepository(tx.conn).get(order_id)
        if order is not None and order.pickup_not_collected(self.clock()):
            await self.save(tx, order)

    async def reservation_timed_out(self, tx: Tx, order_id: str) -> None:
        """No answer from the saga's participants in time: reject the order."""
        order = await OrderRepository(tx.conn).get(order_id)
        if order is not None and order.reservation_timed_out(self.clock()):
            log.warning("order %s got no reservation answer in time: rejected", order_id)
            await self.save(tx, order)

    async def promise_passed(self, tx: Tx, order_id: str) -> None:
        """A shipped order's delivery promise passed: announce the delay."""
        order = await OrderRepository(tx.conn).get(order_id)
        if order is not None and order.promise_overdue(
            self.clock(), extension=self.settings.overdue_eta_extension
        ):
            await self.save(tx, order)

    # -- reads ----------------------------------------------------------------------------

    async def get(
        self, runtime: ServiceRuntime, order_id: str
    ) -> tuple[Order, list[dict[str, Any]], list[dict[str, Any]]]:
        """An order with its history and returns; :class:`OrderNotFound` if unknown."""
        async with runtime.pool.acquire() as conn:
            repo = OrderRepository(conn)
            order = await repo.get(order_id, for_update=False)
            if order is None:
                raise OrderNotFound(f"no order {order_id}")
            return order, await repo.history(order_id), await repo.returns(order_id)

    async def for_customer(
        self, runtime: ServiceRuntime, customer_id: str, *, limit: int, after: PageCursor | None
    ) -> list[Order]:
        """A page of a customer's orders, newest first."""
        async with runtime.pool.acquire() as conn:
            return await OrderRepository(conn).for_customer(customer_id, limit=limit, after=after)

    async def count_by_status(self, runtime: ServiceRuntime) -> dict[str, int]:
        """How many orders stand in each status (for the gauge)."""
        async with runtime.pool.acquire() as conn:
            return await OrderRepository(conn).count_by_status()


def _new_order_id() -> str:
    return f"ord_{uuid.uuid4().hex}"


def _journey(envelope: Envelope | None) -> str:
    # The customer journey this order belongs to: the checkout's, or a new one (HTTP).
    if envelope is None:
        return str(uuid.uuid4())
    return envelope.correlation_id or envelope.id
