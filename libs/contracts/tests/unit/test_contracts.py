"""The contract models and the AsyncAPI document agree with CONTRACT.md (no I/O but reading it)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from omni_contracts import (
    CART_EVENTS,
    CUSTOMER_PROFILE,
    EVENT_TYPES,
    INBOUND,
    INVENTORY_AVAILABILITY,
    STORE_SALES,
    TOPICS,
    Address,
    Allocation,
    AvailabilityChanged,
    CartAbandoned,
    CartItemAdded,
    CheckoutSubmitted,
    ContactDetailsUpdated,
    CustomerIdentified,
    Event,
    Fulfillment,
    LedgerEvent,
    Line,
    Money,
    OrderConfirmed,
    OrderDelayed,
    OrderPlaced,
    PointsEarned,
    ProfilesMerged,
    ReturnLine,
    SaleRecorded,
    Shortage,
    StockAdjusted,
    UnknownEventType,
    asyncapi,
    event_type,
    parse_event,
    schemas,
)
from pydantic import ValidationError

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=2)

# ce_type -> (topic, key) of every event type; changing a row is a breaking change.
EXPECTED: dict[str, tuple[str, str]] = {
    "store.sale.recorded": ("store.sales.v1", "location_id"),
    "inventory.stock.adjusted": ("inventory.adjustments.v1", "sku"),
    **{
        t: ("cart.events.v1", "cart_id")
        for t in ("cart.item.added", "cart.item.removed", "cart.viewed", "cart.checked_out")
    },
    "checkout.submitted": ("checkout.submitted.v1", "customer_id"),
    **{
        t: ("customer.signals.v1", "customer_id")
        for t in (
            "customer.identified",
            "customer.contact.updated",
            "customer.preferences.updated",
            "customer.erasure.requested",
            "customer.stock_alert.requested",
            "customer.push_addresses.gone",
        )
    },
    "order.cancellation.requested": ("order.requests.v1", "order_id"),
    **{
        f"fulfillment.{t}": ("fulfillment.events.v1", "order_id")
        for t in ("ready_for_pickup", "picked_up", "shipped", "eta_changed", "delivered")
    },
    "return.received": ("returns.received.v1", "order_id"),
    "inventory.availability.changed": ("inventory.availability.v1", "sku"),
    **{
        f"inventory.reservation.{t}": ("inventory.reservations.v1", "order_id")
        for t in ("confirmed", "rejected", "released")
    },
    **{
        f"order.{t}": ("order.lifecycle.v1", "order_id")
        for t in (
            "placed",
            "confirmed",
            "rejected",
            "ready_for_pickup",
            "picked_up",
            "shipped",
            "delivered",
            "delayed",
            "cancelled",
            "return_received",
            "refund_issued",
        )
    },
    **{
        t: ("customer.profile.v1", "customer_id")
        for t in (
            "customer.profile.updated",
            "customer.profiles.merged",
            "customer.profiles.unmerged",
            "customer.profile.erased",
        )
    },
    "customer.profiles.unmerge.requested": ("customer.identity.requests.v1", "customer_id"),
    "cart.abandoned": ("cart.abandoned.v1", "cart_id"),
    **{
        f"loyalty.{t}": ("loyalty.ledger.v1", "customer_id")
        for t in (
            "points.earned",
            "points.pending",
            "points.available",
            "points.held",
            "points.refused",
            "points.redeemed",
            "points.released",
            "points.reversed",
            "points.expiring",
            "points.expired",
            "tier.changed",
            "offer.issued",
        )
    },
    **{
        f"notification.{t}": ("notification.dispatched.v1", "customer_id")
        for t in ("sent", "failed", "suppressed", "deferred")
    },
}


def eur(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "EUR"}


LINE = {"sku": "SKU-1", "qty": 2, "unit_price": eur("19.90")}
ORDER = {"order_id": "o-1", "customer_id": "c-1", "channel": "web"}
LEDGER = {"customer_id": "c-1", "balance": 120, "reason": "purchase", "order_id": "o-1"}
CART = {"cart_id": "cart-1", "channel": "app", "anonymous_id": "a-1", "items": [LINE]}

# One valid sample (as a producer would send it) per ce_type.
SAMPLES: dict[str, dict[str, Any]] = {
    "store.sale.recorded": {
        "sale_id": "s-1",
        "location_id": "store-017",
        "lines": [LINE],
        "occurred_at": NOW,
        "loyalty_card": "LC-9",
        "terminal_id": "till-3",
    },
    "inventory.stock.adjusted": {
        "adjustment_id": "adj-1",
        "location_id": "wh-1",
        "sku": "SKU-1",
        "kind": "receipt",
        "delta": 24,
        "occurred_at": NOW,
    },
    "cart.item.added": {**CART, "sku": "SKU-1", "occurred_at": NOW},
    "cart.item.removed": {**CART, "items": [], "sku": "SKU-1", "occurred_at": NOW},
    "cart.viewed": {**CART, "occurred_at": NOW},
    "cart.checked_out": {**CART, "customer_id": "c-1", "checkout_id": "co-1", "occurred_at": NOW},
    "checkout.submitted": {
        "checkout_id": "co-1",
        "customer_id": "c-1",
        "channel": "web",
        "lines": [LINE],
        "fulfillment": {"type": "pickup", "location_id": "store-017"},
        "payment": {"reference": "psp-1", "authorized": eur("39.80")},
        "cart_id": "cart-1",
        "points_to_redeem": 100,
        "occurred_at": NOW,
    },
    "customer.identified": {
        "customer_id": "c-1",
        "anonymous_id": "a-1",
        "channel": "app",
        "method": "login",
        "occurred_at": NOW,
    },
    "customer.contact.updated": {"customer_id": "c-1", "email": "ann@example.com"},
    "customer.preferences.updated": {
        "customer_id": "c-1",
        "preferences": {
            "preferred_channel": "push",
            "consents": {"email": True, "push": True, "sms": False},
            "time_zone": "Europe/Berlin",
            "quiet_hours_start": "21:00:00",
            "quiet_hours_end": "08:00:00",
        },
    },
    "customer.erasure.requested": {"customer_id": "c-1", "channel": "call_center"},
    "customer.stock_alert.requested": {"customer_id": "c-1", "sku": "SKU-1", "channel": "app"},
    "order.cancellation.requested": {"order_id": "o-1", "channel": "store", "reason": "changed"},
    "fulfillment.ready_for_pickup": {"order_id": "o-1", "location_id": "store-017"},
    "fulfillment.picked_up": {"order_id": "o-1", "location_id": "store-017"},
    "fulfillment.shipped": {
        "order_id": "o-1",
        "carrier": "dhl",
        "tracking_id": "T-1",
        "promised_by": LATER,
    },
    "fulfillment.eta_changed": {"order_id": "o-1", "eta": LATER + timedelta(days=1)},
    "fulfillment.delivered": {"order_id": "o-1", "carrier": "dhl"},
    "return.received": {
        "return_id": "r-1",
        "order_id": "o-1",
        "location_id": "store-002",
        "channel": "store",
        "lines": [{"sku": "SKU-1", "qty": 1, "resellable": True}],
        "occurred_at": NOW,
    },
    "inventory.availability.changed": {
        "sku": "SKU-1",
        "location_id": "store-017",
        "on_hand": 3,
        "reserved": 1,
        "available": 2,
        "status": "low_stock",
        "previous_status": "in_stock",
        "online_available": 40,
        "cause": "sale",
        "changed_at": NOW,
    },
    "inventory.reservation.confirmed": {
        "order_id": "o-1",
        "allocations": [{"sku": "SKU-1", "location_id": "wh-1", "qty": 2}],
        "expires_at": LATER,
    },
    "inventory.reservation.rejected": {
        "order_id": "o-1",
        "reason": "insufficient_stock",
        "shortages": [{"sku": "SKU-1", "requested": 2, "available": 1}],
    },
    "inventory.reservation.released": {"order_id": "o-1", "reason": "expired"},
    "order.placed": {
        **ORDER,
        "lines": [LINE],
        "fulfillment": {
            "type": "delivery",
            "address": {
                "line1": "1 Main St",
                "city": "Berlin",
                "postal_code": "10115",
                "country": "DE",
            },
        },
        "total": eur("39.80"),
    },
    "order.confirmed": {**ORDER, "promised_by": LATER},
    "order.rejected": {**ORDER, "reason": "out_of_stock"},
    "order.ready_for_pickup": {**ORDER, "location_id": "store-017"},
    "order.picked_up": {**ORDER, "location_id": "store-017"},
    "order.shipped": {**ORDER, "carrier": "dhl", "tracking_id": "T-1"},
    "order.delivered": {**ORDER},
    "order.delayed": {
        **ORDER,
        "status": "shipped",
        "promised_by": LATER,
        "eta": LATER + timedelta(days=1),
    },
    "order.cancelled": {**ORDER, "reason": "shopper_request"},
    "order.return_received": {
        **ORDER,
        "return_id": "r-1",
        "location_id": "store-002",
        "lines": [{"sku": "SKU-1", "qty": 1, "resellable": False}],
    },
    "order.refund_issued": {**ORDER, "return_id": "r-1", "amount": eur("19.90")},
    "customer.profile.updated": {
        "customer_id": "c-1",
        "version": 7,
        "email": "ann@example.com",
        "anonymous_ids": ["a-1"],
        "preferences": {"preferred_channel": "email"},
    },
    "customer.profiles.merged": {"surviving_id": "c-1", "merged_ids": ["c-2"]},
    "customer.profile.erased": {"customer_id": "c-1"},
    "customer.profiles.unmerged": {"surviving_id": "c-1", "restored_id": "c-2"},
    "customer.profiles.unmerge.requested": {
        "surviving_id": "c-1",
        "merged_id": "c-2",
        "reason": "two shoppers",
    },
    "customer.push_addresses.gone": {"customer_id": "c-1", "endpoints": ["https://p.example/1"]},
    "cart.abandoned": {
        "cart_id": "cart-1",
        "customer_id": "c-1",
        "channel": "web",
        "items": [LINE],
        "value": eur("39.80"),
        "last_activity_at": NOW,
    },
    "loyalty.points.earned": {**LEDGER, "points": 40},
    "loyalty.points.pending": {**LEDGER, "points": 40},
    "loyalty.points.available": {**LEDGER, "points": 40},
    "loyalty.points.expiring": {**LEDGER, "expiring_points": 40, "expires_at": LATER},
    "loyalty.points.held": {**LEDGER, "points": -100},
    "loyalty.points.refused": {**LEDGER, "reason": "insufficient_points", "requested": 500},
    "loyalty.points.redeemed": {**LEDGER, "points": 0},
    "loyalty.points.released": {**LEDGER, "points": 100},
    "loyalty.points.reversed": {**LEDGER, "points": -40},
    "loyalty.points.expired": {**LEDGER, "points": -10, "order_id": None},
    "loyalty.tier.changed": {**LEDGER, "tier": "gold", "previous_tier": "silver"},
    "loyalty.offer.issued": {**LEDGER, "offer_id": "birthday-10"},
    "notification.sent": {
        "customer_id": "c-1",
        "channel": "push",
        "template": "cart_abandoned",
        "provider_message_id": "fcm-1",
    },
    "notification.failed": {"customer_id": "c-1", "error": "smtp 550", "channel": "email"},
    "notification.suppressed": {"customer_id": "c-1", "reason": "quiet_hours"},
    "notification.deferred": {"customer_id": "c-1", "until": LATER},
}


def sample(ce_type: str, **changes: Any) -> Event:
    return event_type(ce_type).model_validate({**SAMPLES[ce_type], **changes})


def invalid(ce_type: str, **changes: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        sample(ce_type, **changes)
    return caught.value


# --- the catalogue ------------------------------------------------------------------------


@pytest.mark.parametrize("ce_type", sorted(EXPECTED))
def test_every_contract_event_type_is_catalogued_on_its_topic_and_key(ce_type: str) -> None:
    topic, key = EXPECTED[ce_type]
    model = event_type(ce_type)
    assert (model.ce_type, model.topic, model.key_field) == (ce_type, topic, key)
    assert TOPICS[topic].key == key
    assert TOPICS[topic].events[ce_type] is model
    assert key in model.model_fields


def test_catalogue_holds_nothing_the_contract_does_not_name() -> None:
    assert set(EVENT_TYPES) == set(EXPECTED)
    assert set(TOPICS) == {topic for topic, _ in EXPECTED.values()}


def test_topic_specs_are_sensible() -> None:
    assert TOPICS[CUSTOMER_PROFILE].compacted
    assert [name for name, spec in TOPICS.items() if spec.compacted] == [CUSTOMER_PROFILE]
    for name in (STORE_SALES, INVENTORY_AVAILABILITY, CART_EVENTS):
        assert TOPICS[name].partitions == 12
    assert all(spec.partitions >= 6 for spec in TOPICS.values())
    assert all(spec.dlq == f"{name}.dlq" for name, spec in TOPICS.items())
    assert all(spec.description for spec in TOPICS.values())


def test_every_event_documents_itself() -> None:
    for model in EVENT_TYPES.values():
        doc = model.__doc__ or ""
        assert doc.strip() and "Produced by" in doc, model.__name__
        assert model.__name__[0].isupper()


def test_unknown_event_type_is_a_key_error() -> None:
    with pytest.raises(UnknownEventType):
        event_type("store.sale.refunded")
    with pytest.raises(KeyError):
        event_type("")


def test_parse_event_validates_json_by_ce_type() -> None:
    event = sample("store.sale.recorded")
    parsed = parse_event("store.sale.recorded", event.model_dump_json().encode())
    assert parsed == event and isinstance(parsed, SaleRecorded)
    assert parse_event("store.sale.recorded", event.model_dump(mode="json")) == event
    with pytest.raises(ValidationError):
        parse_event("inventory.stock.adjusted", event.model_dump_json())


# --- every event ---------------------------------------------------------------------------


def test_there_is_a_sample_of_every_event_type() -> None:
    assert set(SAMPLES) == set(EVENT_TYPES)


@pytest.mark.parametrize("ce_type", sorted(EXPECTED))
def test_json_round_trip(ce_type: str) -> None:
    event = sample(ce_type)
    text = event.model_dump_json()
    assert type(event).model_validate_json(text) == event
    data = json.loads(text)
    # The time field is always there, in UTC with a Z.
    times = [data[f] for f in ("occurred_at", "changed_at") if f in data]
    assert times and all(t.endswith("Z") for t in times)
    assert event.partition_key() == str(data[event.key_field])
    assert event.subject()


@pytest.mark.parametrize("ce_type", sorted(EXPECTED))
def test_required_fields_are_required(ce_type: str) -> None:
    model = event_type(ce_type)
    for name, field in model.model_fields.items():
        if field.is_required() and name in SAMPLES[ce_type]:
            with pytest.raises(ValidationError):
                model.model_validate({k: v for k, v in SAMPLES[ce_type].items() if k != name})


# --- money, times, quantities -------------------------------------------------------------


def test_money_serialises_as_a_decimal_string() -> None:
    assert json.loads(Money(amount=Decimal("19.9"), currency="EUR").model_dump_json()) == eur(
        "19.90"
    )
    assert Money(amount=19.9, currency="EUR").amount == Decimal("19.90")
    payload = json.loads(sample("order.refund_issued").model_dump_json())
    assert payload["amount"] == eur("19.90")
    line = json.loads(sample("store.sale.recorded").model_dump_json())["lines"][0]
    assert line["unit_price"] == eur("19.90")


@pytest.mark.parametrize("amount", [0.1 + 0.2, 19.999, "1.005", -1, "-0.01", 1e15, "NaN"])
def test_money_rejects_bad_amounts(amount: Any) -> None:
    with pytest.raises(ValidationError):
        Money(amount=amount, currency="EUR")


@pytest.mark.parametrize("currency", ["eur", "EURO", "", "E1R"])
def test_money_needs_an_iso_currency(currency: str) -> None:
    with pytest.raises(ValidationError):
        Money(amount="1.00", currency=currency)


def test_mixed_currencies_are_rejected() -> None:
    usd_line = {**LINE, "unit_price": {"amount": "5.00", "currency": "USD"}}
    invalid("store.sale.recorded", lines=[LINE, usd_line])
    invalid(
        "checkout.submitted",
        payment={"reference": "p", "authorized": eur("1.00") | {"currency": "USD"}},
    )
    invalid("cart.abandoned", value={"amount": "39.80", "currency": "GBP"})


@pytest.mark.parametrize(
    ("ce_type", "field"),
    [
        ("store.sale.recorded", "occurred_at"),
        ("inventory.stock.adjusted", "occurred_at"),
        ("cart.viewed", "occurred_at"),
        ("inventory.availability.changed", "changed_at"),
        ("inventory.reservation.confirmed", "expires_at"),
        ("fulfillment.shipped", "promised_by"),
        ("cart.abandoned", "last_activity_at"),
        ("notification.deferred", "until"),
    ],
)
def test_naive_datetimes_are_rejected(ce_type: str, field: str) -> None:
    error = invalid(ce_type, **{field: datetime(2026, 11, 23, 10, 0)})
    assert "timezone" in str(error)
    with pytest.raises(ValidationError):
        sample(ce_type, **{field: "2026-11-23T10:00:00"})


def test_times_are_normalised_to_utc() -> None:
    cet = timezone(timedelta(hours=1))
    event = sample("store.sale.recorded", occurred_at=datetime(2026, 11, 23, 11, 0, tzinfo=cet))
    assert event.occurred_at == NOW and event.occurred_at.tzinfo is UTC
    assert json.loads(event.model_dump_json())["occurred_at"] == "2026-11-23T10:00:00Z"


@pytest.mark.parametrize("qty", [0, -1])
def test_line_quantities_are_positive(qty: int) -> None:
    with pytest.raises(ValidationError):
        Line(sku="SKU-1", qty=qty, unit_price=Money(amount="1.00", currency="EUR"))
    with pytest.raises(ValidationError):
        ReturnLine(sku="SKU-1", qty=qty, resellable=True)
    with pytest.raises(ValidationError):
        Allocation(sku="SKU-1", location_id="wh-1", qty=qty)


@pytest.mark.parametrize("field", ["on_hand", "reserved", "available", "online_available"])
def test_availability_counts_are_never_negative(field: str) -> None:
    invalid("inventory.availability.changed", **{field: -1})


def test_other_counts_are_never_negative() -> None:
    invalid("checkout.submitted", points_to_redeem=-5)
    with pytest.raises(ValidationError):
        Shortage(sku="SKU-1", requested=2, available=-1)
    invalid("inventory.stock.adjusted", kind="count", delta=None, counted=-1)


def test_availability_cannot_exceed_on_hand() -> None:
    invalid("inventory.availability.changed", on_hand=1, available=2)


# --- inventory.stock.adjusted -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "delta"), [("receipt", 5), ("transfer_in", 1), ("damage", -2), ("transfer_out", -3)]
)
def test_delta_kinds_take_a_signed_delta(kind: str, delta: int) -> None:
    event = sample("inventory.stock.adjusted", kind=kind, delta=delta)
    assert isinstance(event, StockAdjusted) and event.delta == delta and event.counted is None
    invalid("inventory.stock.adjusted", kind=kind, delta=None)
    invalid("inventory.stock.adjusted", kind=kind, delta=0)
    invalid("inventory.stock.adjusted", kind=kind, delta=-delta)  # a damage of +2 is a bug
    invalid("inventory.stock.adjusted", kind=kind, counted=4)


def test_count_takes_an_absolute_count() -> None:
    event = sample("inventory.stock.adjusted", kind="count", delta=None, counted=0)
    assert isinstance(event, StockAdjusted) and event.counted == 0
    assert sample("inventory.stock.adjusted", kind="count", delta=None, counted=12)
    invalid("inventory.stock.adjusted", kind="count", delta=None)
    invalid("inventory.stock.adjusted", kind="count", delta=None, counted=-1)
    invalid("inventory.stock.adjusted", kind="count", delta=3, counted=3)
    invalid("inventory.stock.adjusted", kind="shrinkage")


# --- other rules --------------------------------------------------------------------------


def test_unknown_fields_are_kept() -> None:
    raw = {
        **SAMPLES["store.sale.recorded"],
        "till_operator": "op-7",
        "lines": [{**LINE, "discount_code": "XMAS"}],
    }
    event = SaleRecorded.model_validate(raw)
    again = SaleRecorded.model_validate_json(event.model_dump_json())
    data = json.loads(again.model_dump_json())
    assert data["till_operator"] == "op-7"
    assert data["lines"][0]["discount_code"] == "XMAS"
    assert again == event


def test_pickup_needs_a_location() -> None:
    with pytest.raises(ValidationError, match="location_id"):
        Fulfillment(type="pickup")
    assert Fulfillment(
        type="delivery", address=Address(line1="x", city="y", postal_code="1", country="DE")
    )
    invalid("checkout.submitted", fulfillment={"type": "pickup"})
    invalid("checkout.submitted", fulfillment={"type": "teleport", "location_id": "s"})


def test_customer_identified_needs_both_identities() -> None:
    invalid("customer.identified", anonymous_id=None)
    invalid("customer.identified", customer_id=None)
    assert isinstance(sample("customer.identified"), CustomerIdentified)


def test_cart_events_need_a_customer_or_an_anonymous_id() -> None:
    invalid("cart.item.added", anonymous_id=None)
    assert sample("cart.item.added", anonymous_id=None, customer_id="c-1")
    event = sample("cart.item.added", customer_id="c-1")
    assert isinstance(event, CartItemAdded) and event.anonymous_id == "a-1"


def test_contact_update_must_change_something() -> None:
    with pytest.raises(ValidationError):
        ContactDetailsUpdated(customer_id="c-1")
    invalid("customer.contact.updated", email=None)  # null is "unchanged": nothing changes
    removal = sample("customer.contact.updated", email=None, cleared=["phone"])
    assert removal == ContactDetailsUpdated.model_validate_json(removal.model_dump_json())
    invalid("customer.contact.updated", cleared=["email"])  # set and cleared at once
    invalid("customer.contact.updated", cleared=["fax"])


def test_order_events_carry_whose_order_and_its_status() -> None:
    for ce_type, model in EVENT_TYPES.items():
        if model.topic == "order.lifecycle.v1":
            data = json.loads(sample(ce_type).model_dump_json())
            assert {"order_id", "customer_id", "channel", "status"} <= data.keys(), ce_type
    assert sample("order.confirmed").status == "confirmed"
    invalid("order.confirmed", status="shipped")
    invalid("order.delayed", status=None)
    invalid("order.delayed", eta=NOW)  # an eta before the promise is no delay
    # An in-store sale: an anonymous order, born completed.
    born = sample(
        "order.placed",
        customer_id=None,
        channel="store",
        status="completed",
        fulfillment={"type": "pickup", "location_id": "store-017"},
    )
    assert isinstance(born, OrderPlaced) and born.customer_id is None
    invalid("order.placed", customer_id="")
    with pytest.raises(ValidationError):  # customer_id is always carried, if only as null
        OrderConfirmed(order_id="o-1", channel="web")
    assert OrderDelayed.model_fields["status"].is_required()


def test_profiles_merged_is_keyed_by_the_survivor() -> None:
    merged = sample("customer.profiles.merged")
    assert isinstance(merged, ProfilesMerged)
    assert merged.customer_id == merged.surviving_id == merged.partition_key() == "c-1"
    invalid("customer.profiles.merged", customer_id="c-2")
    invalid("customer.profiles.merged", merged_ids=["c-1"])
    invalid("customer.profiles.merged", merged_ids=[])


@pytest.mark.parametrize(
    ("ce_type", "points"),
    [
        ("loyalty.points.earned", 0),
        ("loyalty.points.earned", -1),
        ("loyalty.points.held", 5),
        ("loyalty.points.released", -5),
        ("loyalty.points.expired", 3),
        ("loyalty.points.redeemed", 3),
        ("loyalty.points.reversed", 0),
    ],
)
def test_ledger_points_move_the_right_way(ce_type: str, points: int) -> None:
    invalid(ce_type, points=points)


def test_ledger_entries_share_their_fields() -> None:
    for ce_type, model in EVENT_TYPES.items():
        if model.topic == "loyalty.ledger.v1":
            assert issubclass(model, LedgerEvent)
            data = json.loads(sample(ce_type).model_dump_json())
            assert {"customer_id", "points", "balance", "reason", "order_id"} <= data.keys()
    earned = sample("loyalty.points.earned")
    assert isinstance(earned, PointsEarned) and earned.points == 40


def test_notification_vocabularies_are_closed() -> None:
    invalid("notification.sent", channel="fax")
    invalid("notification.suppressed", reason="bored")
    assert sample("notification.suppressed", reason="no_contact")


def test_cart_abandoned_needs_a_known_shopper_and_items() -> None:
    invalid("cart.abandoned", customer_id=None)
    invalid("cart.abandoned", items=[])
    assert isinstance(sample("cart.abandoned"), CartAbandoned)


def test_checkout_sample_is_a_checkout() -> None:
    checkout = sample("checkout.submitted")
    assert isinstance(checkout, CheckoutSubmitted)
    assert checkout.partition_key() == "c-1" and checkout.subject() == "co-1"


def test_enums_accept_only_contract_values() -> None:
    invalid("inventory.availability.changed", status="few_left")
    invalid("inventory.availability.changed", cause="theft")
    invalid("store.sale.recorded", lines=[])
    invalid("cart.viewed", channel="kiosk")
    assert isinstance(sample("inventory.availability.changed"), AvailabilityChanged)


# --- the AsyncAPI document -----------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return asyncapi.asyncapi_document()


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_asyncapi_has_a_channel_per_topic_and_a_message_per_ce_type(document: dict) -> None:
    assert document["asyncapi"] == "3.0.0"
    channels, messages = document["channels"], document["components"]["messages"]
    for name, spec in TOPICS.items():
        channel = channels[name]
        assert channel["address"] == name
        assert set(channel["messages"]) == set(spec.events)
        assert channel["bindings"]["kafka"]["partitions"] == spec.partitions
        assert channels[spec.dlq]["address"] == spec.dlq
        action = "receive" if spec.direction == INBOUND else "send"
        assert document["operations"][f"{action}.{name}"]["action"] == action
    for ce_type, model in EVENT_TYPES.items():
        message = messages[ce_type]
        assert message["name"] == model.__name__
        assert message["summary"] and message["description"]
        assert message["headers"]["properties"]["ce_type"]["const"] == ce_type
        assert {"ce_id", "ce_source", "ce_time", "ce_specversion"} <= set(
            message["headers"]["required"]
        )
        payload = _resolve(document, message["payload"]["$ref"])
        required = {name for name, field in model.model_fields.items() if field.is_required()}
        assert set(payload["required"]) == required
    compacted = channels[CUSTOMER_PROFILE]["bindings"]["kafka"]["topicConfiguration"]
    assert compacted["cleanup.policy"] == ["compact"]


def test_asyncapi_refs_all_resolve(document: dict) -> None:
    refs = set(_refs(document))
    assert refs
    for ref in refs:
        assert _resolve(document, ref) is not None, ref
    assert "$defs" not in json.dumps(document)


def test_asyncapi_money_and_times_are_strings(document: dict) -> None:
    schemas = document["components"]["schemas"]
    amount = schemas["Money"]["properties"]["amount"]
    assert amount["type"] == "string" and re.fullmatch(amount["pattern"], "19.90")
    assert schemas["SaleRecorded"]["properties"]["occurred_at"]["format"] == "date-time"


def test_asyncapi_main_prints_yaml(document: dict, capsys: pytest.CaptureFixture[str]) -> None:
    asyncapi.main([])
    assert yaml.safe_load(capsys.readouterr().out) == document
    asyncapi.main(["--format", "json"])
    assert json.loads(capsys.readouterr().out) == document


# --- the JSON Schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("ce_type", sorted(EXPECTED))
def test_every_sample_is_valid_against_its_json_schema(ce_type: str) -> None:
    schema = schemas.event_json_schema(event_type(ce_type))
    data = json.loads(sample(ce_type).model_dump_json())
    Draft202012Validator(schema).validate(data)
    renamed = {
        ("renamed_" + k if k == event_type(ce_type).key_field else k): v for k, v in data.items()
    }
    assert not Draft202012Validator(schema).is_valid(renamed), "the key field is required"


def _times_of_day(node: Any, schema: dict[str, Any], defs: dict[str, Any]) -> Iterator[str]:
    """The values a schema says are of format ``time``, wherever they are in ``node``."""
    if "$ref" in schema:
        yield from _times_of_day(node, defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    for variant in schema.get("anyOf", []):
        yield from _times_of_day(node, variant, defs)
    if schema.get("format") == "time" and isinstance(node, str):
        yield node
    if isinstance(node, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in node:
                yield from _times_of_day(node[name], prop, defs)


@pytest.mark.xfail(
    strict=True,
    reason="contract finding, left as it is: a time of day (quiet_hours_*) is written as "
    "'21:00:00', but its schema says format 'time', which is RFC 3339 full-time and needs "
    "an offset, so a validator that asserts formats (ajv-formats) refuses the event",
)
def test_times_of_day_are_what_their_format_says() -> None:
    full_time = re.compile(r"\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", re.IGNORECASE)
    found = []
    for ce_type in ("customer.preferences.updated", "customer.profile.updated"):
        schema = schemas.event_json_schema(event_type(ce_type))
        data = json.loads(sample(ce_type).model_dump_json())
        found += list(_times_of_day(data, schema, schema.get("$defs", {})))
    assert found, "the samples carry quiet hours"
    assert all(full_time.fullmatch(value) for value in found), found
