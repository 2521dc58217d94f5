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
    """Checkouts become orders (the same path as ``POST /orders``)."""
    await orders.place_orders(tx, checkouts)


async def sales_recorded(sales: Lot[SaleRecorded], tx: Tx, orders: OrderService) -> None:
    """Till sales become completed store orders, once per ``sale_id``."""
    await orders.record_sales(tx, sales)


async def reservations_confirmed(
    confirmations: Lot[ReservationConfirmed], tx: Tx, orders: OrderService
) -> None:
    """Inventory said yes: confirm once every participant has."""
    await orders.apply(tx, [orders.reservation_confirmed(e, cause) for e, cause in confirmations])


async def reservations_rejected(
    rejections: Lot[ReservationRejected], tx: Tx, orders: OrderService
) -> None:
    """Inventory said no: reject with its shortages."""
    await orders.apply(tx, [orders.reservation_rejected(e, cause) for e, cause in rejections])


async def reservations_released(
    releases: Lot[ReservationReleased], tx: Tx, orders: OrderService
) -> None:
    """Inventory released the stock: an expiry rejects or cancels the order."""
    await orders.apply(tx, [orders.reservation_released(e, cause) for e, cause in releases])


def _for_a_checkout(answer: PointsHeld | PointsRefused) -> bool:
    """Loyalty's answers in the saga name the order; other holds are not the order's."""
    return answer.order_id is not None


async def points_held(holds: Lot[PointsHeld], tx: Tx, orders: OrderService) -> None:
    """Loyalty held the points: its yes in the saga."""
    await orders.apply(tx, [orders.points_held(e, cause) for e, cause in holds])


async def points_refused(refusals: Lot[PointsRefused], tx: Tx, orders: OrderService) -> None:
    """Loyalty refused (insufficient points, unknown member): reject the order."""
    await orders.apply(tx, [orders.points_refused(e, cause) for e, cause in refusals])


async def cancellations_requested(
    requests: Lot[OrderCancellationRequested], tx: Tx, orders: OrderService
) -> None:
    """A shopper or store asks to cancel: cancelled, or (too late) refused and noted."""
    await orders.apply(tx, [orders.cancellation_requested(tx, e, cause) for e, cause in requests])


async def ready_for_pickup(packed: Lot[ReadyForPickup], tx: Tx, orders: OrderService) -> None:
    """The store packed it: announce and start the not-collected timer."""
    await orders.apply(tx, [orders.ready_for_pickup(e, cause) for e, cause in packed])


async def picked_up(collected: Lot[PickedUp], tx: Tx, orders: OrderService) -> None:
    """The shopper collected it."""
    await orders.apply(tx, [orders.picked_up(e, cause) for e, cause in collected])


async def shipped(shipments: Lot[Shipped], tx: Tx, orders: OrderService) -> None:
    """It left with a carrier: watch the delivery promise."""
    await orders.apply(tx, [orders.shipped(e, cause) for e, cause in shipments])


async def eta_changed(changes: Lot[EtaChanged], tx: Tx, orders: OrderService) -> None:
    """A carrier's new ETA: past the promise, announce the delay once per ETA."""
    await orders.apply(tx, [orders.eta_changed(e, cause) for e, cause in changes])


async def delivered(deliveries: Lot[Delivered], tx: Tx, orders: OrderService) -> None:
    """The carrier delivered it: the promise is kept or moot."""
    await orders.apply(tx, [orders.delivered(e, cause) for e, cause in deliveries])


async def returns_received(returns: Lot[ReturnReceived], tx: Tx, orders: OrderService) -> None:
    """Goods handed back anywhere: announce where (inventory restocks) and refund them."""
    for returned, cause in returns:
        await orders.receive_return(tx, returned, cause)


async def profiles_erased(erasures: Lot[ProfileErased], tx: Tx, orders: OrderService) -> None:
    """Shoppers were forgotten: their orders lose addresses and contacts, keep amounts."""
    await orders.erase_customers(tx, [e.customer_id for e, _ in erasures])


async def pickups_not_collected(due: list[Due], tx: Tx, orders: OrderService) -> None:
    """Timer: packed pickup orders were not collected in time."""
    await orders.expire(tx, PICKUP_TIMER, [timer.key for timer in due])


async def reservations_timed_out(due: list[Due], tx: Tx, orders: OrderService) -> None:
    """Timer: the saga's participants did not answer in time."""
    await orders.expire(tx, RESERVATION_TIMER, [timer.key for timer in due])


async def promises_passed(due: list[Due], tx: Tx, orders: OrderService) -> None:
    """Timer: shipped orders' delivery promises passed."""
    await orders.expire(tx, PROMISE_TIMER, [timer.key for timer in due])


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
