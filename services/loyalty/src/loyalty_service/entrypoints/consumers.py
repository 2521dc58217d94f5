"""What the loyalty service consumes and which timers it keeps: one handler per kind of event.

Everything loyalty needs to know arrives as events: orders (placed, confirmed, rejected,
cancelled, fulfilled, returned), profiles (cards linked, merges and unmerges, erasures) and
stock (for offers). Each handler has the runtime's shape (see ``omni_common.handlers``) and calls a
use case of :class:`~loyalty_service.service.ledger.LoyaltyService` in the transaction it is
given; a failure is retried by the runtime, then dead-lettered.
"""

from __future__ import annotations

from omni_common.handlers import Due, Lot, Subscription
from omni_common.service import Tx
from omni_contracts import (
    CUSTOMER_PROFILE,
    INVENTORY_AVAILABILITY,
    ORDER_LIFECYCLE,
    AvailabilityChanged,
    OrderCancelled,
    OrderConfirmed,
    OrderDelivered,
    OrderPickedUp,
    OrderPlaced,
    OrderRejected,
    OrderReturnReceived,
    OrderShipped,
    ProfileErased,
    ProfilesMerged,
    ProfilesUnmerged,
    ProfileUpdated,
)

from loyalty_service.service.ledger import (
    EXPIRY_NOTICE_TIMER,
    EXPIRY_TIMER,
    HOLD_TIMER,
    PENDING_TIMER,
    TIER_REVIEW_TIMER,
    LoyaltyService,
)


async def orders_placed(orders: Lot[OrderPlaced], tx: Tx, loyalty: LoyaltyService) -> None:
    """Remember the orders; hold points of those awaiting loyalty; store sales earn."""
    await loyalty.orders_placed(tx, orders)


async def orders_confirmed(orders: Lot[OrderConfirmed], tx: Tx, loyalty: LoyaltyService) -> None:
    """Confirmed orders spend the points held for them."""
    await loyalty.orders_confirmed(tx, orders)


async def orders_ended(
    orders: Lot[OrderRejected | OrderCancelled], tx: Tx, loyalty: LoyaltyService
) -> None:
    """Rejected or cancelled: held points go back; points spent on it are given back."""
    for order, envelope in orders:
        await loyalty.order_ended(tx, order, envelope)


async def orders_fulfilled(
    orders: Lot[OrderPickedUp | OrderShipped | OrderDelivered], tx: Tx, loyalty: LoyaltyService
) -> None:
    """Picked up, shipped or delivered: the purchase earns (once)."""
    for order, envelope in orders:
        await loyalty.order_fulfilled(tx, order, envelope)


async def returns_received(
    returns: Lot[OrderReturnReceived], tx: Tx, loyalty: LoyaltyService
) -> None:
    """Items came back: reverse the points earned on them, give back points spent."""
    for returned, envelope in returns:
        await loyalty.return_received(tx, returned, envelope)


async def profiles_updated(profiles: Lot[ProfileUpdated], tx: Tx, loyalty: LoyaltyService) -> None:
    """Profiles: their cards now collect for the customer; points a card collected move."""
    await loyalty.profiles_updated(tx, profiles)


async def profiles_merged(merges: Lot[ProfilesMerged], tx: Tx, loyalty: LoyaltyService) -> None:
    """Profiles merged: the merged accounts' points move to the surviving one."""
    for merge, envelope in merges:
        await loyalty.profiles_merged(tx, merge, envelope)


async def profiles_unmerged(
    unmerges: Lot[ProfilesUnmerged], tx: Tx, loyalty: LoyaltyService
) -> None:
    """A merge undone: the restored account gets back the points that were its own."""
    for unmerge, envelope in unmerges:
        await loyalty.profiles_unmerged(tx, unmerge, envelope)


async def profiles_erased(erasures: Lot[ProfileErased], tx: Tx, loyalty: LoyaltyService) -> None:
    """Erasure: pseudonymise the account (the ledger keeps only figures)."""
    for erased, envelope in erasures:
        await loyalty.profile_erased(tx, erased, envelope)


async def availability_changed(
    changes: Lot[AvailabilityChanged], tx: Tx, loyalty: LoyaltyService
) -> None:
    """Keep the stock that offers are filtered by."""
    await loyalty.stock_changed(tx, changes)


async def holds_expired(due: list[Due], tx: Tx, loyalty: LoyaltyService) -> None:
    """Timer: a hold never settled is released."""
    for timer in due:
        await loyalty.hold_expired(tx, timer.key)


async def pending_closed(due: list[Due], tx: Tx, loyalty: LoyaltyService) -> None:
    """Timer: an order's return window closed, its pending points become available."""
    for timer in due:
        await loyalty.pending_closed(tx, timer.key)


async def points_expire(due: list[Due], tx: Tx, loyalty: LoyaltyService) -> None:
    """Timer: points expire after inactivity."""
    for timer in due:
        await loyalty.expire(tx, timer.key)


async def expiry_notices(due: list[Due], tx: Tx, loyalty: LoyaltyService) -> None:
    """Timer: the notice before points expire."""
    for timer in due:
        await loyalty.expiry_notice(tx, timer.key, timer.payload)


async def tier_reviews(due: list[Due], tx: Tx, loyalty: LoyaltyService) -> None:
    """Timer: a tier's review date."""
    for timer in due:
        await loyalty.tier_review(tx, timer.key)


def subscriptions() -> list[Subscription]:
    """Every topic the loyalty service consumes, with its handlers."""
    return [
        Subscription(
            ORDER_LIFECYCLE,
            {
                OrderPlaced: orders_placed,
                OrderConfirmed: orders_confirmed,
                OrderRejected: orders_ended,
                OrderCancelled: orders_ended,
                OrderPickedUp: orders_fulfilled,
                OrderShipped: orders_fulfilled,
                OrderDelivered: orders_fulfilled,
                OrderReturnReceived: returns_received,
            },
        ),
        Subscription(
            CUSTOMER_PROFILE,
            {
                ProfileUpdated: profiles_updated,
                ProfilesMerged: profiles_merged,
                ProfilesUnmerged: profiles_unmerged,
                ProfileErased: profiles_erased,
            },
        ),
        Subscription(INVENTORY_AVAILABILITY, {AvailabilityChanged: availability_changed}),
    ]


TIMERS = {
    PENDING_TIMER: pending_closed,
    HOLD_TIMER: holds_expired,
    EXPIRY_TIMER: points_expire,
    EXPIRY_NOTICE_TIMER: expiry_notices,
    TIER_REVIEW_TIMER: tier_reviews,
}
"""Loyalty's durable timers, by kind."""
