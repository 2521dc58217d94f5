"""What the loyalty service consumes: one subscription per topic, handlers bound to it.

Everything loyalty needs to know arrives as events: orders (placed, confirmed, rejected,
cancelled, fulfilled, returned), profiles (cards linked, erasures) and stock (for offers).
A failure is retried with backoff by the foundation, then dead-lettered.
"""

from __future__ import annotations

from omni_common.kafka import Subscription
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
    ProfileUpdated,
)

from loyalty_service.service.ledger import LoyaltyService


def subscriptions(service: LoyaltyService) -> list[Subscription]:
    """Every topic the loyalty service consumes, with its handlers."""
    s = service
    return [
        Subscription(
            ORDER_LIFECYCLE,
            {
                OrderPlaced: s.on_order_placed,
                OrderConfirmed: s.on_order_confirmed,
                OrderRejected: s.on_order_ended,
                OrderCancelled: s.on_order_ended,
                OrderPickedUp: s.on_order_fulfilled,
                OrderShipped: s.on_order_fulfilled,
                OrderDelivered: s.on_order_fulfilled,
                OrderReturnReceived: s.on_return_received,
            },
        ),
        Subscription(
            CUSTOMER_PROFILE,
            {
                ProfileUpdated: s.on_profile_updated,
                ProfilesMerged: s.on_profiles_merged,
                ProfileErased: s.on_profile_erased,
            },
        ),
        Subscription(INVENTORY_AVAILABILITY, {AvailabilityChanged: s.on_availability}),
    ]
