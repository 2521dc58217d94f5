"""What the notification service consumes: each event handled in its own transaction with
the inbox, so a redelivered event decides nothing twice."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from omni_common.kafka import EventHandler, Subscription, only_when
from omni_common.service import ServiceRuntime, Tx
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
    OrderPlaced,
    OrderReadyForPickup,
    PointsExpiring,
    ProfileErased,
    ProfilesMerged,
    ProfileUpdated,
    RefundIssued,
    StockAlertRequested,
    TierChanged,
)
from omni_contracts.envelope import Envelope

from notification_service.adapters.repository import NotificationRepository
from notification_service.service.notify import Notifier


def subscriptions(runtime: ServiceRuntime, notifier: Notifier) -> list[Subscription]:
    """Every topic the service consumes, with its handlers."""

    def handler(topic: str, work: Callable[[Tx, Any, Envelope], Awaitable[Any]]) -> EventHandler:
        consumer = f"{runtime.settings.service_name}:{topic}"

        async def handle(event: Any, envelope: Envelope) -> None:
            async with runtime.handling(consumer, envelope) as tx:
                if tx is None:
                    return  # handled before: no second effect
                await work(tx, event, envelope)

        return handle

    n = notifier

    async def profile_updated(tx: Tx, event: ProfileUpdated, _: Envelope) -> None:
        await NotificationRepository(tx.conn).save_contact(event)

    async def profile_erased(tx: Tx, event: ProfileErased, _: Envelope) -> None:
        await n.erase(tx, event.customer_id)

    async def profiles_merged(tx: Tx, event: ProfilesMerged, _: Envelope) -> None:
        await NotificationRepository(tx.conn).merge(event.surviving_id, event.merged_ids)

    async def cart_checked_out(tx: Tx, event: CartCheckedOut, _: Envelope) -> None:
        await n.cart_bought(tx, event.cart_id, "checked_out")

    async def order_placed(tx: Tx, event: OrderPlaced, _: Envelope) -> None:
        await n.order_placed(tx, event)

    order = handler(ORDER_LIFECYCLE, n.order_update)
    loyalty = handler(LOYALTY_LEDGER, n.loyalty)
    return [
        Subscription(
            CUSTOMER_PROFILE,
            {
                ProfileUpdated: handler(CUSTOMER_PROFILE, profile_updated),
                ProfileErased: handler(CUSTOMER_PROFILE, profile_erased),
                ProfilesMerged: handler(CUSTOMER_PROFILE, profiles_merged),
            },
        ),
        Subscription(
            CUSTOMER_SIGNALS,
            {StockAlertRequested: handler(CUSTOMER_SIGNALS, n.stock_alert_requested)},
        ),
        Subscription(CART_EVENTS, {CartCheckedOut: handler(CART_EVENTS, cart_checked_out)}),
        Subscription(CART_ABANDONED, {CartAbandoned: handler(CART_ABANDONED, n.cart_abandoned)}),
        Subscription(
            INVENTORY_AVAILABILITY,
            {AvailabilityChanged: handler(INVENTORY_AVAILABILITY, n.availability_changed)},
        ),
        Subscription(
            ORDER_LIFECYCLE,
            {
                # An anonymous store sale has nobody whose purchases to remember.
                OrderPlaced: only_when(
                    lambda e: e.customer_id is not None, handler(ORDER_LIFECYCLE, order_placed)
                ),
                OrderConfirmed: order,
                OrderReadyForPickup: order,
                OrderDelayed: order,
                OrderCancelled: order,
                RefundIssued: order,
            },
        ),
        Subscription(
            LOYALTY_LEDGER, {TierChanged: loyalty, OfferIssued: loyalty, PointsExpiring: loyalty}
        ),
    ]
