"""What the notification service consumes and which timers it keeps: one handler per kind of
event.

Each handler has the runtime's shape (see ``omni_common.handlers``) and decides through the
:class:`~notification_service.service.notify.Notifier` in the transaction it is given, so a
redelivered event decides nothing twice. Sending is the dispatcher's work, after commit.
"""

from __future__ import annotations

from omni_common.handlers import Due, Lot, Subscription, only_when
from omni_common.service import Tx
from omni_contracts import (
    CART_ABANDONED,
    CART_EVENTS,
    CUSTOMER_PROFILE,
    CUSTOMER_SIGNALS,
    INVENTORY_AVAILABILITY,
    LOYALTY_LEDGER,
    ORDER_LIFECYCLE,
    AvailabilityChanged,
    CartAbandoned,
    CartCheckedOut,
    OfferIssued,
    OrderCancelled,
    OrderConfirmed,
    OrderDelayed,
    OrderEvent,
    OrderPlaced,
    OrderReadyForPickup,
    PointsExpiring,
    ProfileErased,
    ProfilesMerged,
    ProfilesUnmerged,
    ProfileUpdated,
    RefundIssued,
    StockAlertRequested,
    TierChanged,
)

from notification_service.adapters.repository import NotificationRepository
from notification_service.adapters.sets import NotificationSets
from notification_service.service.notify import (
    CART_REMINDER_TIMER,
    DEFERRED_TIMER,
    STOCK_ALERT_TIMER,
    Notifier,
)


async def profiles_updated(profiles: Lot[ProfileUpdated], tx: Tx) -> None:
    """A profile snapshot: the contact, consents and preferences to decide with."""
    await NotificationSets(tx.conn).save_contacts([profile for profile, _ in profiles])


async def profiles_erased(erasures: Lot[ProfileErased], tx: Tx, notifier: Notifier) -> None:
    """A shopper was forgotten: their contact, history and pending messages go."""
    for erased, _ in erasures:
        await notifier.erase(tx, erased.customer_id)


async def profiles_merged(merges: Lot[ProfilesMerged], tx: Tx) -> None:
    """Profiles merged: what was known of the merged ones moves to the survivor."""
    repo = NotificationRepository(tx.conn)
    for merge, _ in merges:
        await repo.merge(merge.surviving_id, merge.merged_ids)


async def profiles_unmerged(unmerges: Lot[ProfilesUnmerged], tx: Tx) -> None:
    """A merge undone: the restored shopper's alerts, offers, purchases and history are
    theirs again (their contact comes back with their own snapshot, which follows)."""
    repo = NotificationRepository(tx.conn)
    for unmerge, _ in unmerges:
        await repo.unmerge(unmerge.surviving_id, unmerge.restored_id)


async def stock_alerts_requested(
    requests: Lot[StockAlertRequested], tx: Tx, notifier: Notifier
) -> None:
    """A shopper signs up for one back-in-stock message."""
    for request, envelope in requests:
        await notifier.stock_alert_requested(tx, request, envelope)


async def carts_checked_out(checkouts: Lot[CartCheckedOut], tx: Tx, notifier: Notifier) -> None:
    """A cart was bought: no reminder from now on."""
    for cart, _ in checkouts:
        await notifier.cart_bought(tx, cart.cart_id, "checked_out")


async def carts_abandoned(carts: Lot[CartAbandoned], tx: Tx, notifier: Notifier) -> None:
    """A cart was left: remind the shopper, on their channel, at a decent hour."""
    for cart, envelope in carts:
        await notifier.cart_abandoned(tx, cart, envelope)


async def availability_changed(
    changes: Lot[AvailabilityChanged], tx: Tx, notifier: Notifier
) -> None:
    """Keep the latest availability; tell the shoppers waiting for it, once each."""
    await notifier.availability_changed(tx, changes)


def _for_a_shopper(order: OrderEvent) -> bool:
    """An anonymous store sale has nobody to tell and no purchases to remember."""
    return order.customer_id is not None


async def orders_placed(orders: Lot[OrderPlaced], tx: Tx, notifier: Notifier) -> None:
    """Remember what the shopper bought: carts holding it need no reminder."""
    await notifier.orders_placed(tx, [order for order, _ in orders])


async def orders_updated(orders: Lot[OrderEvent], tx: Tx, notifier: Notifier) -> None:
    """Confirmed, ready for pickup, delayed, cancelled, refunded: tell the shopper."""
    await notifier.order_updates(tx, orders)


async def loyalty_news(
    news: Lot[TierChanged | OfferIssued | PointsExpiring], tx: Tx, notifier: Notifier
) -> None:
    """A new tier, an offer, points about to expire: tell the shopper."""
    for item, envelope in news:
        await notifier.loyalty(tx, item, envelope)


async def deferred_due(due: list[Due], tx: Tx, notifier: Notifier) -> None:
    """Timer: quiet hours are over; decide again."""
    for timer in due:
        await notifier.deferred_due(tx, timer.key)


async def stock_alerts_due(due: list[Due], tx: Tx, notifier: Notifier) -> None:
    """Timer: the next batch of shoppers waiting for a SKU back in stock is told."""
    for timer in due:
        await notifier.alerts_due(tx, timer.payload)


async def second_reminders_due(due: list[Due], tx: Tx, notifier: Notifier) -> None:
    """Timer: the cart is still abandoned a day later; re-check and remind again."""
    for timer in due:
        await notifier.second_reminder_due(tx, timer.payload)


def subscriptions() -> list[Subscription]:
    """Every topic the notification service consumes, with its handlers."""
    return [
        Subscription(
            CUSTOMER_PROFILE,
            {
                ProfileUpdated: profiles_updated,
                ProfileErased: profiles_erased,
                ProfilesMerged: profiles_merged,
                ProfilesUnmerged: profiles_unmerged,
            },
        ),
        Subscription(CUSTOMER_SIGNALS, {StockAlertRequested: stock_alerts_requested}),
        Subscription(CART_EVENTS, {CartCheckedOut: carts_checked_out}),
        Subscription(CART_ABANDONED, {CartAbandoned: carts_abandoned}),
        Subscription(INVENTORY_AVAILABILITY, {AvailabilityChanged: availability_changed}),
        Subscription(
            ORDER_LIFECYCLE,
            {
                OrderPlaced: only_when(_for_a_shopper, orders_placed),
                OrderConfirmed: only_when(_for_a_shopper, orders_updated),
                OrderReadyForPickup: only_when(_for_a_shopper, orders_updated),
                OrderDelayed: only_when(_for_a_shopper, orders_updated),
                OrderCancelled: only_when(_for_a_shopper, orders_updated),
                RefundIssued: only_when(_for_a_shopper, orders_updated),
            },
        ),
        Subscription(
            LOYALTY_LEDGER,
            {TierChanged: loyalty_news, OfferIssued: loyalty_news, PointsExpiring: loyalty_news},
        ),
    ]


TIMERS = {
    DEFERRED_TIMER: deferred_due,
    CART_REMINDER_TIMER: second_reminders_due,
    STOCK_ALERT_TIMER: stock_alerts_due,
}
"""The notification service's durable timers, by kind."""
