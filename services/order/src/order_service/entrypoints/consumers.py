"""What the order service consumes and which timers it keeps: one handler per kind of event.

Each handler has the runtime's shape (see ``omni_common.handlers``) and calls a use case
of :class:`~order_service.service.orders.OrderService` in the transaction it is given.
Domain refusals (``unknown_order``, ``illegal_transition``, ``idempotency_conflict``,
``invalid_order``, ``return_conflict``, ``nothing_to_return``) are dead-lettered with their
reason by the runtime; anything else is retried, then dead-lettered.
"""

from __future__ import annotations

from omni_common.handlers import Due, Lot, Subscription, only_when
from omni_common.service import Tx
from omni_contracts import (
    CHECKOUT_SUBMITTED,
    CUSTOMER_PROFILE,
    FULFILLMENT_EVENTS,
    INVENTORY_RESERVATIONS,
    LOYALTY_LEDGER,
    ORDER_REQUESTS,
    RETURNS_RECEIVED,
    STORE_SALES,
    CheckoutSubmitted,
    Delivered,
    EtaChanged,
    OrderCancellationRequested,
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
)

from order_service.service.orders import (
    PICKUP_TIMER,
    PROMISE_TIMER,
    RESERVATION_TIMER,
    OrderService,
)


async def checkouts_submitted(
    checkouts: Lot[CheckoutSubmitted], tx: Tx, orders: OrderService
) -> None:
    """A checkout becomes an order (the same path as ``POST /orders``)."""
    for checkout, envelope in checkouts:
        await orders.place_order(tx, checkout, envelope)


async def sales_recorded(sales: Lot[SaleRecorded], tx: Tx, orders: OrderService) -> None:
    """A till sale becomes a completed store order, once per ``sale_id``."""
    for sale, envelope in sales:
        await orders.record_sale(tx, sale, envelope)


async def reservations_confirmed(
    confirmations: Lot[ReservationConfirmed], tx: Tx, orders: OrderService
) -> None:
    """Inventory said yes: confirm once every participant has."""
    for yes, envelope in confirmations:
        await orders.reservation_confirmed(tx, yes, envelope)


async def reservations_rejected(
    rejections: Lot[ReservationRejected], tx: Tx, orders: OrderService
) -> None:
    """Inventory said no: reject with its shortages."""
    for no, envelope in rejections:
        await orders.reservation_rejected(tx, no, envelope)


async def reservations_released(
    releases: Lot[ReservationReleased], tx: Tx, orders: OrderService
) -> None:
    """Inventory released the stock: an expiry rejects or cancels the order."""
    for released, envelope in releases:
        await orders.reservation_released(tx, released, envelope)


def _for_a_checkout(answer: PointsHeld | PointsRefused) -> bool:
    """Loyalty's answers in the saga name the order; other holds are not the order's."""
    return answer.order_id is not None


async def points_held(holds: Lot[PointsHeld], tx: Tx, orders: OrderService) -> None:
    """Loyalty held the points: its yes in the saga."""
    for held, envelope in holds:
        await orders.points_held(tx, held, envelope)


async def points_refused(refusals: Lot[PointsRefused], tx: Tx, orders: OrderService) -> None:
    """Loyalty refused (insufficient points, unknown member): reject the order."""
    for refused, envelope in refusals:
        await orders.points_refused(tx, refused, envelope)


async def cancellations_requested(
    requests: Lot[OrderCancellationRequested], tx: Tx, orders: OrderService
) -> None:
    """A shopper or store asks to cancel: cancelled, or (too late) refused and noted."""
    for request, envelope in requests:
        await orders.request_cancellation(tx, request, envelope)


async def ready_for_pickup(packed: Lot[ReadyForPickup], tx: Tx, orders: OrderService) -> None:
    """The store packed it: announce and start the not-collected timer."""
    for ready, envelope in packed:
        await orders.ready_for_pickup(tx, ready, envelope)


async def picked_up(collected: Lot[PickedUp], tx: Tx, orders: OrderService) -> None:
    """The shopper collected it."""
    for pickup, envelope in collected:
        await orders.picked_up(tx, pickup, envelope)


async def shipped(shipments: Lot[Shipped], tx: Tx, orders: OrderService) -> None:
    """It left with a carrier: watch the delivery promise."""
    for shipment, envelope in shipments:
        await orders.shipped(tx, shipment, envelope)


async def eta_changed(changes: Lot[EtaChanged], tx: Tx, orders: OrderService) -> None:
    """A carrier's new ETA: past the promise, announce the delay once per ETA."""
    for change, envelope in changes:
        await orders.eta_changed(tx, change, envelope)


async def delivered(deliveries: Lot[Delivered], tx: Tx, orders: OrderService) -> None:
    """The carrier delivered it: the promise is kept or moot."""
    for delivery, envelope in deliveries:
        await orders.delivered(tx, delivery, envelope)


async def returns_received(returns: Lot[ReturnReceived], tx: Tx, orders: OrderService) -> None:
    """Goods handed back anywhere: announce where (inventory restocks) and refund them."""
    for returned, envelope in returns:
        await orders.receive_return(tx, returned, envelope)


async def profiles_erased(erasures: Lot[ProfileErased], tx: Tx, orders: OrderService) -> None:
    """A shopper was forgotten: their orders lose addresses and contacts, keep amounts."""
    for erased, _ in erasures:
        await orders.erase_customer(tx, erased.customer_id)


async def pickups_not_collected(due: list[Due], tx: Tx, orders: OrderService) -> None:
    """Timer: a packed pickup order was not collected in time."""
    for timer in due:
        await orders.pickup_not_collected(tx, timer.key)


async def reservations_timed_out(due: list[Due], tx: Tx, orders: OrderService) -> None:
    """Timer: the saga's participants did not answer in time."""
    for timer in due:
        await orders.reservation_timed_out(tx, timer.key)


async def promises_passed(due: list[Due], tx: Tx, orders: OrderService) -> None:
    """Timer: a shipped order's delivery promise passed."""
    for timer in due:
        await orders.promise_passed(tx, timer.key)


def subscriptions() -> list[Subscription]:
    """Every topic the order service consumes, with its handlers."""
    return [
        Subscription(CHECKOUT_SUBMITTED, {CheckoutSubmitted: checkouts_submitted}),
        Subscription(STORE_SALES, {SaleRecorded: sales_recorded}),
        Subscription(
            INVENTORY_RESERVATIONS,
            {
                ReservationConfirmed: reservations_confirmed,
                ReservationRejected: reservations_rejected,
                ReservationReleased: reservations_released,
            },
        ),
        # Loyalty's answers in the saga; the other ledger events are dropped by type.
        Subscription(
            LOYALTY_LEDGER,
            {
                PointsHeld: only_when(_for_a_checkout, points_held),
                PointsRefused: only_when(_for_a_checkout, points_refused),
            },
        ),
        Subscription(ORDER_REQUESTS, {OrderCancellationRequested: cancellations_requested}),
        Subscription(
            FULFILLMENT_EVENTS,
            {
                ReadyForPickup: ready_for_pickup,
                PickedUp: picked_up,
                Shipped: shipped,
                EtaChanged: eta_changed,
                Delivered: delivered,
            },
        ),
        Subscription(RETURNS_RECEIVED, {ReturnReceived: returns_received}),
        # Erasures only; the profile snapshots are dropped by type, undecoded.
        Subscription(CUSTOMER_PROFILE, {ProfileErased: profiles_erased}),
    ]


TIMERS = {
    PICKUP_TIMER: pickups_not_collected,
    PROMISE_TIMER: promises_passed,
    RESERVATION_TIMER: reservations_timed_out,
}
"""The order service's durable timers, by kind."""
