"""The catalogue of public topics and event types (CONTRACT.md as code).

``TOPICS`` says, per topic, its key, partitions, direction and event types; ``EVENT_TYPES``
maps each CloudEvents ``ce_type`` to its model. Both are checked for consistency at import,
so an event class with a wrong topic or key cannot slip in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omni_contracts.base import Event, TopicSpec
from omni_contracts.common import (
    CART_ABANDONED,
    CART_EVENTS,
    CHECKOUT_SUBMITTED,
    CUSTOMER_IDENTITY_REQUESTS,
    CUSTOMER_PROFILE,
    CUSTOMER_SIGNALS,
    FULFILLMENT_EVENTS,
    INVENTORY_ADJUSTMENTS,
    INVENTORY_AVAILABILITY,
    INVENTORY_RESERVATIONS,
    LOYALTY_LEDGER,
    NOTIFICATION_DISPATCHED,
    ORDER_LIFECYCLE,
    ORDER_REQUESTS,
    RETURNS_RECEIVED,
    STORE_SALES,
)
from omni_contracts.inbound import INBOUND_EVENTS
from omni_contracts.outbound import OUTBOUND_EVENTS

__all__ = [
    "CART_ABANDONED",
    "CART_EVENTS",
    "CHECKOUT_SUBMITTED",
    "CUSTOMER_IDENTITY_REQUESTS",
    "CUSTOMER_PROFILE",
    "CUSTOMER_SIGNALS",
    "EVENT_TYPES",
    "FULFILLMENT_EVENTS",
    "INBOUND",
    "INVENTORY_ADJUSTMENTS",
    "INVENTORY_AVAILABILITY",
    "INVENTORY_RESERVATIONS",
    "LOYALTY_LEDGER",
    "NOTIFICATION_DISPATCHED",
    "ORDER_LIFECYCLE",
    "ORDER_REQUESTS",
    "OUTBOUND",
    "RETURNS_RECEIVED",
    "STORE_SALES",
    "TOPICS",
    "UnknownEventType",
    "event_type",
    "parse_event",
    "topic_specs",
]

INBOUND = "inbound"
"""Direction of a topic channels produce and the platform consumes."""
OUTBOUND = "outbound"
"""Direction of a topic the platform produces and channels consume."""

# (name, key, partitions, direction, compacted, description). High-volume topics get 12
# partitions so consumers can scale out; the rest 6 (partitions can grow, never shrink).
_TOPIC_ROWS: tuple[tuple[str, str, int, str, bool, str], ...] = (
    (STORE_SALES, "location_id", 12, INBOUND, False, "Sales recorded at store tills."),
    (
        INVENTORY_ADJUSTMENTS,
        "sku",
        6,
        INBOUND,
        False,
        "Stock received, counted, damaged or transferred at stores and warehouses.",
    ),
    (CART_EVENTS, "cart_id", 12, INBOUND, False, "Shopping cart activity on web and app."),
    (
        CHECKOUT_SUBMITTED,
        "customer_id",
        6,
        INBOUND,
        False,
        "Checkouts submitted with an authorised payment.",
    ),
    (
        CUSTOMER_SIGNALS,
        "customer_id",
        6,
        INBOUND,
        False,
        "Logins, sign-ups, contact and preference changes, erasure requests.",
    ),
    (
        CUSTOMER_IDENTITY_REQUESTS,
        "customer_id",
        6,
        INBOUND,
        False,
        "Identity corrections from ops and the call centre: undo a wrong merge.",
    ),
    (ORDER_REQUESTS, "order_id", 6, INBOUND, False, "Requests to cancel an order."),
    (
        FULFILLMENT_EVENTS,
        "order_id",
        6,
        INBOUND,
        False,
        "Pickup, shipment and delivery progress from stores, warehouses and carriers.",
    ),
    (RETURNS_RECEIVED, "order_id", 6, INBOUND, False, "Items handed back at stores or warehouses."),
    (
        INVENTORY_AVAILABILITY,
        "sku",
        12,
        OUTBOUND,
        False,
        "Sellable stock per SKU and location, and what may be sold online.",
    ),
    (
        INVENTORY_RESERVATIONS,
        "order_id",
        6,
        OUTBOUND,
        False,
        "Stock reservations for orders: confirmed, rejected, released.",
    ),
    (ORDER_LIFECYCLE, "order_id", 6, OUTBOUND, False, "Every order's lifecycle, all channels."),
    (
        CUSTOMER_PROFILE,
        "customer_id",
        6,
        OUTBOUND,
        True,
        "Customer profile snapshots (log-compacted), merges and erasures.",
    ),
    (CART_ABANDONED, "cart_id", 6, OUTBOUND, False, "Carts left untouched by known shoppers."),
    (
        LOYALTY_LEDGER,
        "customer_id",
        6,
        OUTBOUND,
        False,
        "Loyalty points ledger entries, tier changes and offers.",
    ),
    (
        NOTIFICATION_DISPATCHED,
        "customer_id",
        6,
        OUTBOUND,
        False,
        "Outcomes of notifications to shoppers: sent, failed, suppressed, deferred.",
    ),
)


class UnknownEventType(KeyError):
    """A ``ce_type`` that no model in the catalogue describes."""


def _build(
    rows: Iterable[tuple[str, str, int, str, bool, str]], models: Iterable[type[Event]]
) -> tuple[dict[str, TopicSpec], dict[str, type[Event]]]:
    # Raise (not assert: asserts vanish under -O) on any mismatch between rows and models.
    event_types: dict[str, type[Event]] = {}
    by_topic: dict[str, dict[str, type[Event]]] = {}
    for model in models:
        if model.ce_type in event_types:
            raise TypeError(f"ce_type {model.ce_type!r} is declared twice")
        event_types[model.ce_type] = model
        by_topic.setdefault(model.topic, {})[model.ce_type] = model
    topics: dict[str, TopicSpec] = {}
    for name, key, partitions, direction, compacted, description in rows:
        events = by_topic.pop(name, {})
        if not events:
            raise TypeError(f"topic {name!r} has no event types")
        for model in events.values():
            if model.key_field != key or key not in model.model_fields:
                raise TypeError(f"{model.__name__} must be keyed by the topic's key {key!r}")
        topics[name] = TopicSpec(
            name=name,
            key=key,
            partitions=partitions,
            description=description,
            direction=direction,
            compacted=compacted,
            events=events,
        )
    if by_topic:
        raise TypeError(f"events on unknown topics: {sorted(by_topic)}")
    return topics, event_types


TOPICS: dict[str, TopicSpec]
"""Every public topic by name."""
EVENT_TYPES: dict[str, type[Event]]
"""Every event model by its ``ce_type``."""
TOPICS, EVENT_TYPES = _build(_TOPIC_ROWS, (*INBOUND_EVENTS, *OUTBOUND_EVENTS))


def topic_specs(direction: str | None = None) -> list[TopicSpec]:
    """The topics of one direction (``INBOUND`` or ``OUTBOUND``), or all of them."""
    return [spec for spec in TOPICS.values() if direction in (None, spec.direction)]


def event_type(ce_type: str) -> type[Event]:
    """The model of ``ce_type``; raise :class:`UnknownEventType` if there is none."""
    try:
        return EVENT_TYPES[ce_type]
    except KeyError:
        raise UnknownEventType(ce_type) from None


def parse_event(ce_type: str, data: str | bytes | Mapping[str, Any]) -> Event:
    """Validate a message value (JSON text or a mapping) as the event ``ce_type`` names.

    Raises :class:`UnknownEventType` or :class:`pydantic.ValidationError`.
    """
    model = event_type(ce_type)
    if isinstance(data, str | bytes):
        return model.model_validate_json(data)
    return model.model_validate(data)
