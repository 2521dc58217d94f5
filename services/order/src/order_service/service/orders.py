"""The order service's use cases: one method per thing that can happen to an order.

Each takes the transaction it runs in (``tx``), whoever opened it: the runtime for an event
(``entrypoints/consumers.py``), an HTTP route, or a timer. Domain refusals surface as
:class:`~order_service.domain.errors.OrderError`, which the runtime dead-letters with its
reason and HTTP answers with a client error.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from omni_common.service import ServiceRuntime, Tx
from omni_common.timers import cancel_timers, set_timers
from omni_contracts import (
    CheckoutSubmitted,
    Delivered,
    EtaChanged,
    OrderCancellationRequested,
    OrderEvent,
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


@dataclass(frozen=True)
class Change:
    """One event's change to one order: ``apply`` changes it in place and says whether
    anything happened (``always``: save even when nothing did, e.g. an ETA still on time).
    Once it changed, the timers of ``disarm`` are cancelled and ``arm`` is set (pickup: by
    ``collect_by``, promise: by ``promised_by``); ``settles_saga`` ends the wait for the
    saga's answers once the order left ``placed``."""

    order_id: str
    cause: Envelope | None
    apply: Callable[[Order, datetime], bool]
    disarm: tuple[str, ...] = ()
    arm: str | None = None
    settles_saga: bool = False
    always: bool = False


class _Timers:
    """The timers a run of changes cancels and sets: the last word per order wins."""

    def __init__(self) -> None:
        self._due: dict[str, dict[str, datetime | None]] = {}

    def disarm(self, kind: str, order_id: str) -> None:
        self._due.setdefault(kind, {})[order_id] = None

    def arm(self, kind: str, order_id: str, due: datetime) -> None:
        self._due.setdefault(kind, {})[order_id] = due

    async def write(self, tx: Tx) -> None:
        for kind, by_order in self._due.items():
            await cancel_timers(tx.conn, kind, [k for k, due in by_order.items() if due is None])
            await set_timers(
                tx.conn,
                kind,
                [(k, due, None, None) for k, due in by_order.items() if due is not None],
            )


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

    async def apply(
        self, tx: Tx, changes: Sequence[Change], *, missing_ok: bool = False
    ) -> dict[str, Order]:
        """Apply changes to orders, in order, with one read and one write for all of them.

        Each change sees the order as the changes before it left it, and what it causes is
        caused by its own event. Raises :class:`OrderNotFound` for an order that does not
        exist (unless ``missing_ok``: a timer outliving its order). Returns the orders saved.
        """
        orders = await OrderRepository(tx.conn).get_many([c.order_id for c in changes])
        now = self.clock()
        touched: dict[str, Order] = {}
        caused: list[tuple[Order, Envelope | None, list[OrderEvent]]] = []
        timers = _Timers()
        for c in changes:
            order = orders.get(c.order_id)
            if order is None:
                if missing_ok:
                    continue
                raise OrderNotFound(f"no order {c.order_id}")
            before = len(order.events)
            changed = c.apply(order, now)
            if changed or c.always:
                touched[order.order_id] = order
            if not changed:
                continue
            caused.append((order, c.cause, order.events[before:]))
            for kind in c.disarm:
                timers.disarm(kind, order.order_id)
            if c.settles_saga and order.status is not OrderStatus.PLACED:
                timers.disarm(RESERVATION_TIMER, order.order_id)
            if c.arm is not None:
                due = order.collect_by if c.arm == PICKUP_TIMER else order.promised_by
                assert due is not None
                timers.arm(c.arm, order.order_id, due)
        await self.save(tx, list(touched.values()), caused)
        await timers.write(tx)
        return touched

    async def save(
        self,
        tx: Tx,
        orders: Sequence[Order],
        caused: Sequence[tuple[Order, Envelope | None, Sequence[OrderEvent]]],
        *,
        new: bool = False,
    ) -> None:
        """Persist the orders' changes (one statement) and write the events each change
        caused to the outbox, caused by its event and carrying the order's journey as
        ``correlation_id``, whether it came from Kafka, HTTP or a timer. Status changes are
        counted once committed."""
        if not new:
            await OrderRepository(tx.conn).save_many(orders)
        for order, cause, events in caused:
            for event in events:
                await tx.emit(event, caused_by=cause, correlation_id=order.correlation_id)
        for order in orders:
            statuses, channel = list(order.transitions), order.channel.value
            tx.after_commit(lambda s=statuses, c=channel: self.metrics.transitioned(s, c))
            order.events.clear()
            order.transitions.clear()
            order.new_returns.clear()
            order.notes.clear()

    # -- placing orders -------------------------------------------------------------------

    async def place_orders(
        self, tx: Tx, checkouts: Sequence[tuple[CheckoutSubmitted, Envelope | None]]
    ) -> list[Placement]:
        """Turn checkouts into orders, once per ``checkout_id`` (topic or HTTP alike).

        Raises :class:`IdempotencyConflict` when a ``checkout_id`` came before with a
        different checkout, and :class:`~order_service.domain.errors.InvalidOrder` when one
        cannot be an order.
        """
        now = self.clock()
        built = [
            (
                Order.from_checkout(
                    checkout,
                    order_id=_new_order_id(),
                    correlation_id=_journey(envelope),
                    participants=required_participants(
                        checkout.points_to_redeem, loyalty_in_saga=self.settings.loyalty_in_saga
                    ),
                    now=now,
                ),
                f"checkout:{checkout.checkout_id}",
                checkout_fingerprint(checkout),
                envelope,
            )
            for checkout, envelope in checkouts
        ]
        placements = await self._create(tx, built, what="checkout")
        due = now + self.settings.reservation_timeout
        await set_timers(
            tx.conn,
            RESERVATION_TIMER,
            [
                (placement.order.order_id, due, None, tx.trace_of(cause))
                for placement, (_, _, _, cause) in zip(placements, built, strict=True)
                if placement.created
            ],
        )
        for placement in placements:
            if placement.created:
                log.info("order %s placed", placement.order.order_id)
        return placements

    async def place_order(
        self, tx: Tx, checkout: CheckoutSubmitted, envelope: Envelope | None = None
    ) -> Placement:
        """One checkout (``POST /orders``): see :meth:`place_orders`."""
        (placement,) = await self.place_orders(tx, [(checkout, envelope)])
        return placement

    async def record_sales(self, tx: Tx, sales: Sequence[tuple[SaleRecorded, Envelope]]) -> None:
        """Till sales become orders with channel=store, born completed, once per sale_id."""
        now = self.clock()
        built = [
            (
                Order.from_store_sale(
                    sale, order_id=_new_order_id(), correlation_id=_journey(envelope), now=now
                ),
                f"sale:{sale.sale_id}",
                sale_fingerprint(sale),
                envelope,
            )
            for sale, envelope in sales
        ]
        await self._create(tx, built, what="sale")

    async def _create(
        self,
        tx: Tx,
        built: Sequence[tuple[Order, str, str, Envelope | None]],
        *,
        what: str,
    ) -> list[Placement]:
        """Insert the orders whose idempotency key is free; the others were created before
        (the same request again: its order) or clash (another request under the key)."""
        repo = OrderRepository(tx.conn)
        created = await repo.create([(order, key, digest) for order, key, digest, _ in built])
        taken = [key for order, key, _, _ in built if order.order_id not in created]
        known = await repo.keys(taken) if taken else {}
        placements: list[Placement] = []
        for order, key, digest, _ in built:
            if order.order_id in created:
                placements.append(Placement(order, created=True))
                continue
            record = known[key]
            if record.request_hash != digest:
                raise IdempotencyConflict(
                    f"{what} {key.split(':', 1)[1]} was submitted before with other content"
                )
            existing = await repo.get(record.order_id, for_update=False)
            assert existing is not None
            placements.append(Placement(existing, created=False))
        new = [p.order for p in placements if p.created]
        caused = [(o, e, list(o.events)) for o, _, _, e in built if o.order_id in created]
        await self.save(tx, new, caused, new=True)
        return placements

    # -- the saga and the order's life ---------------------------------------------------

    @staticmethod
    def reservation_confirmed(yes: ReservationConfirmed, cause: Envelope) -> Change:
        """Inventory said yes: confirm once every participant has."""
        return Change(
            yes.order_id,
            cause,
            lambda o, now: o.participant_confirmed(INVENTORY, now, allocations=yes.allocations),
            settles_saga=True,
        )

    @staticmethod
    def reservation_rejected(no: ReservationRejected, cause: Envelope) -> Change:
        """Inventory said no: reject with its shortages."""
        return Change(
            no.order_id,
            cause,
            lambda o, now: o.participant_rejected(
                INVENTORY, no.reason, now, shortages=no.shortages
            ),
            settles_saga=True,
        )

    @staticmethod
    def reservation_released(released: ReservationReleased, cause: Envelope) -> Change:
        """Inventory released the stock: an expiry rejects or cancels the order."""

        def change(order: Order, now: datetime) -> bool:
            changed = order.reservation_released(released.reason, now)
            if changed:
                order.note("reservation_released", released.reason)
            return changed

        return Change(released.order_id, cause, change, disarm=(PICKUP_TIMER,), settles_saga=True)

    @staticmethod
    def points_held(held: PointsHeld, cause: Envelope) -> Change:
        """Loyalty held the points: its yes, worth ``value`` against the total."""
        assert held.order_id is not None  # only a checkout's hold reaches the saga
        value = held.value.amount if held.value is not None else None
        return Change(
            held.order_id,
            cause,
            lambda o, now: o.participant_confirmed(LOYALTY, now, points_value=value),
        )

    @staticmethod
    def points_refused(refused: PointsRefused, cause: Envelope) -> Change:
        """Loyalty refused (insufficient points, unknown member): reject the order."""
        assert refused.order_id is not None
        return Change(
            refused.order_id,
            cause,
            lambda o, now: o.participant_rejected(LOYALTY, refused.reason.value, now),
        )

    def cancellation_requested(
        self, tx: Tx, request: OrderCancellationRequested, cause: Envelope
    ) -> Change:
        """Cancel, or (too late to cancel) refuse, count and note it.

        A late request is business as usual (the contract says it is ignored), not a
        poison message: it is kept in the order's history rather than dead-lettered.
        """

        def change(order: Order, now: datetime) -> bool:
            try:
                return order.cancel(request.reason, now)
            except IllegalTransition as exc:
                tx.after_commit(self.metrics.refused)
                log.info("cancellation of %s refused: %s", order.order_id, exc)
                order.note(
                    "cancellation_refused",
                    f"{exc.message}; requested by {request.channel}: {request.reason}",
                )
                return True  # the note is worth keeping

        return Change(request.order_id, cause, change, disarm=(PICKUP_TIMER,))

    def ready_for_pickup(self, ready: ReadyForPickup, cause: Envelope) -> Change:
        """The store packed it: announce and start the not-collected timer."""
        return Change(
            ready.order_id,
            cause,
            lambda o, now: o.ready_for_pickup(
                now,
                window=self.settings.pickup_window,
                location_id=ready.location_id,
                collect_by=ready.collect_by,
            ),
            arm=PICKUP_TIMER,
        )

    @staticmethod
    def picked_up(pickup: PickedUp, cause: Envelope) -> Change:
        """The shopper collected it."""
        return Change(
            pickup.order_id,
            cause,
            lambda o, now: o.picked_up(now, location_id=pickup.location_id),
            disarm=(PICKUP_TIMER,),
        )

    @staticmethod
    def shipped(shipment: Shipped, cause: Envelope) -> Change:
        """It left with a carrier: watch the delivery promise."""
        return Change(
            shipment.order_id,
            cause,
            lambda o, now: o.shipped(
                now,
                carrier=shipment.carrier,
                tracking_id=shipment.tracking_id,
                promised_by=shipment.promised_by,
            ),
            arm=PROMISE_TIMER,
        )

    @staticmethod
    def eta_changed(change: EtaChanged, cause: Envelope) -> Change:
        """A carrier's new ETA: past the promise, announce the delay once per ETA (an ETA
        still on time is remembered too)."""
        return Change(
            change.order_id, cause, lambda o, now: o.eta_changed(change.eta, now), always=True
        )

    @staticmethod
    def delivered(delivery: Delivered, cause: Envelope) -> Change:
        """The carrier delivered it: the promise is kept or moot."""
        return Change(
            delivery.order_id, cause, lambda o, now: o.delivered(now), disarm=(PROMISE_TIMER,)
        )

    async def cancel(self, tx: Tx, order_id: str, reason: str) -> Order:
        """Cancel an order (HTTP): raises IllegalTransition once it is fulfilled."""
        try:
            touched = await self.apply(
                tx,
                [
                    Change(
                        order_id, None, lambda o, now: o.cancel(reason, now), disarm=(PICKUP_TIMER,)
                    )
                ],
            )
        except IllegalTransition:
            self.metrics.refused()
            raise
        if order_id in touched:
            return touched[order_id]
        order = await OrderRepository(tx.conn).get(order_id, for_update=False)
        assert order is not None
        return order

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
            await cancel_timers(tx.conn, PROMISE_TIMER, [order.order_id])
            await self.save(tx, [order], [(order, envelope, list(order.events))])

    async def erase_customers(self, tx: Tx, customer_ids: Sequence[str]) -> None:
        """Shoppers were forgotten: their orders lose addresses and contacts, keep amounts."""
        repo = OrderRepository(tx.conn)
        for customer_id in customer_ids:
            erased = await repo.erase_customer(customer_id)
            log.info("erased personal data of %d orders of a customer", erased)

    # -- timers ---------------------------------------------------------------------------

    async def expire(self, tx: Tx, kind: str, order_ids: Sequence[str]) -> None:
        """Timers of ``kind`` came due for these orders: apply what each means."""
        extension = self.settings.overdue_eta_extension
        ends: dict[str, Callable[[Order, datetime], bool]] = {
            PICKUP_TIMER: lambda o, now: o.pickup_not_collected(now),
            RESERVATION_TIMER: lambda o, now: o.reservation_timed_out(now),
            PROMISE_TIMER: lambda o, now: o.promise_overdue(now, extension=extension),
        }
        changes = [Change(order_id, None, ends[kind]) for order_id in order_ids]
        touched = await self.apply(tx, changes, missing_ok=True)
        if kind == RESERVATION_TIMER:
            for order_id in touched:
                log.warning("order %s got no reservation answer in time: rejected", order_id)

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
