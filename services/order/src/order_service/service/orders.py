"""The order service's use cases: one method per thing that can happen to an order.

Event handlers (``async def on_x(event, envelope)``) and HTTP/timer entry points share the
same code paths; domain refusals surface as :class:`~order_service.domain.errors.OrderError`
for the entrypoints to map onto the DLQ or HTTP status codes.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from omni_common.service import ServiceRuntime
from omni_common.timers import TimerWheel, cancel_timer, set_timer
from omni_contracts import (
    CheckoutSubmitted,
    Delivered,
    EtaChanged,
    OrderCancellationRequested,
    OrderStatus,
    PickedUp,
    PointsHeld,
    PointsRefused,
    ProfileErased,
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
from order_service.service.unit_of_work import UnitOfWork, unit_of_work
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
        runtime: ServiceRuntime,
        settings: OrderSettings,
        metrics: OrderMetrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.clock = clock

    # -- units of work --------------------------------------------------------------------

    def unit_of_work(
        self, envelope: Envelope | None = None, consumer: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[UnitOfWork | None]:
        """A unit of work for one change (see :func:`unit_of_work`)."""
        return unit_of_work(self.runtime, self.metrics, envelope=envelope, consumer=consumer)

    @contextlib.asynccontextmanager
    async def _timer_transaction(self) -> AsyncIterator[UnitOfWork]:
        async with self.unit_of_work() as uow:
            assert uow is not None
            yield uow

    def timer_wheel(self) -> TimerWheel:
        """The durable timers of orders (pickup not collected, delivery promise passed)."""
        return TimerWheel(
            self._timer_transaction,
            {
                PICKUP_TIMER: self._pickup_not_collected,
                PROMISE_TIMER: self._promise_passed,
                RESERVATION_TIMER: self._reservation_timed_out,
            },
            poll_interval_s=self.settings.timer_poll_interval_s,
            metrics=self.runtime.metrics,
        )

    @staticmethod
    def _consumer(envelope: Envelope | None) -> str | None:
        # One inbox namespace for the whole service: a ce_id is unique across topics.
        return "order" if envelope is not None else None

    # -- placing orders -------------------------------------------------------------------

    async def place_order(
        self, checkout: CheckoutSubmitted, envelope: Envelope | None = None
    ) -> Placement | None:
        """Turn a checkout into an order, once per ``checkout_id`` (topic or HTTP alike).

        Returns None for a redelivered event; raises :class:`IdempotencyConflict` when the
        ``checkout_id`` came before with a different checkout, and
        :class:`~order_service.domain.errors.InvalidOrder` when it cannot be an order.
        """
        key = f"checkout:{checkout.checkout_id}"
        request_hash = checkout_fingerprint(checkout)
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return None
            existing = await uow.repo.lock_key(key)
            if existing is not None:
                if existing.request_hash != request_hash:
                    raise IdempotencyConflict(
                        f"checkout {checkout.checkout_id} was submitted before with other content"
                    )
                order = await uow.repo.get(existing.order_id, for_update=False)
                assert order is not None
                return Placement(order, created=False)
            order = Order.from_checkout(
                checkout,
                order_id=_new_order_id(),
                correlation_id=_journey(envelope),
                participants=required_participants(
                    checkout.points_to_redeem, loyalty_in_saga=self.settings.loyalty_in_saga
                ),
                now=self.clock(),
            )
            await uow.commit(order, new=True)
            await uow.repo.remember_key(key, request_hash, order.order_id)
            await set_timer(
                uow.conn,
                RESERVATION_TIMER,
                order.order_id,
                self.clock() + self.settings.reservation_timeout,
            )
        log.info("order %s placed for checkout %s", order.order_id, checkout.checkout_id)
        return Placement(order, created=True)

    async def on_checkout(self, event: CheckoutSubmitted, envelope: Envelope) -> None:
        """checkout.submitted.v1 -> an order (same path as ``POST /orders``)."""
        await self.place_order(event, envelope)

    async def on_sale(self, event: SaleRecorded, envelope: Envelope) -> None:
        """store.sales.v1 -> an order with channel=store, born completed, once per sale_id."""
        key = f"sale:{event.sale_id}"
        request_hash = sale_fingerprint(event)
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return
            existing = await uow.repo.lock_key(key)
            if existing is not None:
                if existing.request_hash != request_hash:
                    raise IdempotencyConflict(
                        f"sale {event.sale_id} was recorded before with other content"
                    )
                return  # the till sent it again: one order
            order = Order.from_store_sale(
                event,
                order_id=_new_order_id(),
                correlation_id=_journey(envelope),
                now=self.clock(),
            )
            await uow.commit(order, new=True)
            await uow.repo.remember_key(key, request_hash, order.order_id)

    # -- the reservation saga -------------------------------------------------------------

    async def on_reservation_confirmed(
        self, event: ReservationConfirmed, envelope: Envelope
    ) -> None:
        """Inventory said yes: confirm once every participant has."""
        await self._apply(
            event.order_id,
            envelope,
            lambda o, now: o.participant_confirmed(INVENTORY, now, allocations=event.allocations),
            settles_saga=True,
        )

    async def on_reservation_rejected(self, event: ReservationRejected, envelope: Envelope) -> None:
        """Inventory said no: reject with its shortages."""
        await self._apply(
            event.order_id,
            envelope,
            lambda o, now: o.participant_rejected(
                INVENTORY, event.reason, now, shortages=event.shortages
            ),
            settles_saga=True,
        )

    async def on_reservation_released(self, event: ReservationReleased, envelope: Envelope) -> None:
        """Inventory released the stock: an expiry rejects or cancels the order."""

        def released(order: Order, now: datetime) -> bool:
            changed = order.reservation_released(event.reason, now)
            if changed:
                order.note("reservation_released", event.reason)
            return changed

        await self._apply(
            event.order_id, envelope, released, cancels_pickup=True, settles_saga=True
        )

    async def on_points_held(self, event: PointsHeld, envelope: Envelope) -> None:
        """Loyalty held the points: its yes, worth ``value`` against the total."""
        if event.order_id is None:
            return  # not a checkout's hold: nothing for the saga
        value = event.value.amount if event.value is not None else None
        await self._apply(
            event.order_id,
            envelope,
            lambda o, now: o.participant_confirmed(LOYALTY, now, points_value=value),
        )

    async def on_points_refused(self, event: PointsRefused, envelope: Envelope) -> None:
        """Loyalty refused (insufficient points, unknown member): reject the order."""
        if event.order_id is None:
            return
        await self._apply(
            event.order_id,
            envelope,
            lambda o, now: o.participant_rejected(LOYALTY, event.reason.value, now),
        )

    # -- cancellation ---------------------------------------------------------------------

    async def cancel(self, order_id: str, reason: str) -> Order:
        """Cancel an order (HTTP): raises IllegalTransition once it is fulfilled."""
        async with self.unit_of_work() as uow:
            assert uow is not None
            order = await uow.load(order_id)
            if order.cancel(reason, self.clock()):
                await cancel_timer(uow.conn, PICKUP_TIMER, order.order_id)
                await uow.commit(order)
        return order

    async def on_cancellation_requested(
        self, event: OrderCancellationRequested, envelope: Envelope
    ) -> None:
        """order.requests.v1: cancel, or (too late to cancel) refuse, count and note it.

        A late request is business as usual (the contract says it is ignored), not a
        poison message: it is kept in the order's history rather than dead-lettered.
        """
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return
            order = await uow.load(event.order_id)
            try:
                changed = order.cancel(event.reason, self.clock())
            except IllegalTransition as exc:
                uow.tx.after_commit(self.metrics.refused)
                log.info("cancellation of %s refused: %s", order.order_id, exc)
                order.note(
                    "cancellation_refused",
                    f"{exc.message}; requested by {event.channel}: {event.reason}",
                )
                changed = True  # the note is worth keeping
            else:
                await cancel_timer(uow.conn, PICKUP_TIMER, order.order_id)
            if changed:
                await uow.commit(order)

    # -- fulfilment -----------------------------------------------------------------------

    async def on_ready_for_pickup(self, event: ReadyForPickup, envelope: Envelope) -> None:
        """The store packed it: announce and start the not-collected timer."""
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return
            order = await uow.load(event.order_id)
            if order.ready_for_pickup(
                self.clock(),
                window=self.settings.pickup_window,
                location_id=event.location_id,
                collect_by=event.collect_by,
            ):
                assert order.collect_by is not None
                await set_timer(uow.conn, PICKUP_TIMER, order.order_id, order.collect_by)
                await uow.commit(order)

    async def on_picked_up(self, event: PickedUp, envelope: Envelope) -> None:
        """The shopper collected it."""
        await self._apply(
            event.order_id,
            envelope,
            lambda o, now: o.picked_up(now, location_id=event.location_id),
            cancels_pickup=True,
        )

    async def on_shipped(self, event: Shipped, envelope: Envelope) -> None:
        """It left with a carrier: watch the delivery promise."""
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return
            order = await uow.load(event.order_id)
            if order.shipped(
                self.clock(),
                carrier=event.carrier,
                tracking_id=event.tracking_id,
                promised_by=event.promised_by,
            ):
                await set_timer(uow.conn, PROMISE_TIMER, order.order_id, event.promised_by)
                await uow.commit(order)

    async def on_eta_changed(self, event: EtaChanged, envelope: Envelope) -> None:
        """A carrier's new ETA: past the promise, announce the delay once per ETA."""
        await self._apply(
            event.order_id, envelope, lambda o, now: o.eta_changed(event.eta, now), always=True
        )

    async def on_delivered(self, event: Delivered, envelope: Envelope) -> None:
        """The carrier delivered it: the promise is kept or moot."""
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return
            order = await uow.load(event.order_id)
            if order.delivered(self.clock()):
                await cancel_timer(uow.conn, PROMISE_TIMER, order.order_id)
                await uow.commit(order)

    # -- returns --------------------------------------------------------------------------

    async def on_profile_erased(self, event: ProfileErased, envelope: Envelope) -> None:
        """A shopper was forgotten: their orders lose addresses and contacts, keep amounts."""
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return
            erased = await uow.repo.erase_customer(event.customer_id)
        log.info("erased personal data of %d orders of customer %s", erased, event.customer_id)

    async def on_return_received(self, event: ReturnReceived, envelope: Envelope) -> None:
        """Goods handed back anywhere: announce where (inventory restocks) and refund them."""
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return
            order = await uow.repo.get_for_return(event.order_id)
            if order is None:
                raise OrderNotFound(f"no order {event.order_id}")
            if order.receive_return(
                return_id=event.return_id,
                location_id=event.location_id,
                channel=event.channel,
                lines=event.lines,
                now=self.clock(),
            ):
                await cancel_timer(uow.conn, PROMISE_TIMER, order.order_id)
                await uow.commit(order)

    # -- timers ---------------------------------------------------------------------------

    async def _pickup_not_collected(
        self, uow: UnitOfWork, order_id: str, _payload: dict[str, Any]
    ) -> None:
        order = await uow.repo.get(order_id)
        if order is not None and order.pickup_not_collected(self.clock()):
            await uow.commit(order)

    async def _reservation_timed_out(
        self, uow: UnitOfWork, order_id: str, _payload: dict[str, Any]
    ) -> None:
        order = await uow.repo.get(order_id)
        if order is not None and order.reservation_timed_out(self.clock()):
            log.warning("order %s got no reservation answer in time: rejected", order_id)
            await uow.commit(order)

    async def _promise_passed(
        self, uow: UnitOfWork, order_id: str, _payload: dict[str, Any]
    ) -> None:
        order = await uow.repo.get(order_id)
        if order is not None and order.promise_overdue(
            self.clock(), extension=self.settings.overdue_eta_extension
        ):
            await uow.commit(order)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, order_id: str) -> tuple[Order, list[dict[str, Any]], list[dict[str, Any]]]:
        """An order with its history and returns; :class:`OrderNotFound` if unknown."""
        async with self.runtime.pool.acquire() as conn:
            repo = OrderRepository(conn)
            order = await repo.get(order_id, for_update=False)
            if order is None:
                raise OrderNotFound(f"no order {order_id}")
            return order, await repo.history(order_id), await repo.returns(order_id)

    async def for_customer(
        self, customer_id: str, *, limit: int, after: PageCursor | None
    ) -> list[Order]:
        """A page of a customer's orders, newest first."""
        async with self.runtime.pool.acquire() as conn:
            return await OrderRepository(conn).for_customer(customer_id, limit=limit, after=after)

    async def count_by_status(self) -> dict[str, int]:
        """How many orders stand in each status (for the gauge)."""
        async with self.runtime.pool.acquire() as conn:
            return await OrderRepository(conn).count_by_status()

    # -- helpers --------------------------------------------------------------------------

    async def _apply(
        self,
        order_id: str,
        envelope: Envelope,
        change: Callable[[Order, datetime], bool],
        *,
        cancels_pickup: bool = False,
        always: bool = False,
        settles_saga: bool = False,
    ) -> None:
        """Load, change, commit: the shape of most event handlers.

        ``change`` returns whether anything happened; ``always`` saves even when no event
        results (e.g. a new ETA that is still on time is worth remembering).
        """
        async with self.unit_of_work(envelope, self._consumer(envelope)) as uow:
            if uow is None:
                return
            order = await uow.load(order_id)
            changed = change(order, self.clock())
            if cancels_pickup and changed:
                await cancel_timer(uow.conn, PICKUP_TIMER, order.order_id)
            if settles_saga and changed and order.status is not OrderStatus.PLACED:
                await cancel_timer(uow.conn, RESERVATION_TIMER, order.order_id)
            if changed or always:
                await uow.commit(order)


def _new_order_id() -> str:
    return f"ord_{uuid.uuid4().hex}"


def _journey(envelope: Envelope | None) -> str:
    # The customer journey this order belongs to: the checkout's, or a new one (HTTP).
    if envelope is None:
        return str(uuid.uuid4())
    return envelope.correlation_id or envelope.id
