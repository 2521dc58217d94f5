"""What the order service consumes: one subscription per topic, handlers bound to the service.

Domain refusals become :class:`~omni_common.kafka.RejectedEvent` (dead-lettered at once with
the refusal's reason: ``unknown_order``, ``illegal_transition``, ``idempotency_conflict``,
``invalid_order``, ``return_conflict``, ``nothing_to_return``); anything else is retried with
backoff by the foundation, then dead-lettered.
"""

from __future__ import annotations

import functools
from typing import Any

from omni_common.kafka import EventHandler, RejectedEvent, Subscription
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
from omni_contracts.envelope import Envelope

from order_service.domain.errors import OrderError
from order_service.service.orders import OrderService


def refusing(handler: EventHandler) -> EventHandler:
    """Turn the domain's refusals into dead letters with the refusal's reason."""

    @functools.wraps(handler)
    async def handle(event: Any, envelope: Envelope) -> None:
        try:
            await handler(event, envelope)
        except OrderError as exc:
            raise RejectedEvent(exc.reason, exc.message) from exc

    return handle


def subscriptions(service: OrderService) -> list[Subscription]:
    """Every topic the order service consumes, with its handlers."""
    s = service
    return [
        Subscription(CHECKOUT_SUBMITTED, {CheckoutSubmitted: refusing(s.on_checkout)}),
        Subscription(STORE_SALES, {SaleRecorded: refusing(s.on_sale)}),
        Subscription(
            INVENTORY_RESERVATIONS,
            {
                ReservationConfirmed: refusing(s.on_reservation_confirmed),
                ReservationRejected: refusing(s.on_reservation_rejected),
                ReservationReleased: refusing(s.on_reservation_released),
            },
        ),
        # Loyalty's answers in the saga (other ledger events are not the order's concern).
        Subscription(
            LOYALTY_LEDGER,
            {
                PointsHeld: refusing(s.on_points_held),
                PointsRefused: refusing(s.on_points_refused),
            },
        ),
        Subscription(
            ORDER_REQUESTS,
            {OrderCancellationRequested: refusing(s.on_cancellation_requested)},
        ),
        Subscription(
            FULFILLMENT_EVENTS,
            {
                ReadyForPickup: refusing(s.on_ready_for_pickup),
                PickedUp: refusing(s.on_picked_up),
                Shipped: refusing(s.on_shipped),
                EtaChanged: refusing(s.on_eta_changed),
                Delivered: refusing(s.on_delivered),
            },
        ),
        Subscription(RETURNS_RECEIVED, {ReturnReceived: refusing(s.on_return_received)}),
        Subscription(CUSTOMER_PROFILE, {ProfileErased: refusing(s.on_profile_erased)}),
    ]
