"""CloudEvents binary-mode envelope: what CONTRACT.md fixes, and clear errors otherwise."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from omni_contracts import StockAdjusted
from omni_contracts.envelope import (
    EnvelopeError,
    PayloadError,
    decode,
    encode,
    new_envelope,
    parse_envelope,
)

ADJUSTED = StockAdjusted(
    adjustment_id="adj-1",
    location_id="store-1",
    sku="SKU-1",
    kind="receipt",
    delta=4,
    occurred_at=datetime(2026, 11, 23, 9, 30, tzinfo=UTC),
)


def test_headers_carry_the_cloudevents_attributes() -> None:
    envelope = new_envelope(ADJUSTED, source="/channels/pos/store-017")
    headers = envelope.headers()
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_type"] == "inventory.stock.adjusted"
    assert headers["ce_source"] == "/channels/pos/store-017"
    assert headers["ce_subject"] == "SKU-1"
    assert headers["content-type"] == "application/json"
    assert headers["ce_time"].endswith("Z")
    uuid.UUID(headers["ce_id"])
    # A journey starts with its first event: correlation is that event's id.
    assert headers["correlation_id"] == headers["ce_id"]
    assert "causation_id" not in headers


def test_caused_events_keep_the_correlation_and_name_their_cause() -> None:
    first = new_envelope(ADJUSTED, source="/a")
    second = new_envelope(ADJUSTED, source="/b", caused_by=first)
    assert second.correlation_id == first.correlation_id
    assert second.causation_id == first.id
    assert second.id != first.id


def test_round_trip_through_kafka_headers_and_value() -> None:
    envelope = new_envelope(ADJUSTED, source="/a")
    raw_headers = [(k, v.encode()) for k, v in envelope.headers().items()]
    assert parse_envelope(raw_headers) == envelope
    assert decode(StockAdjusted, encode(ADJUSTED)) == ADJUSTED


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing CloudEvents header"),
        ({"ce_id": "x", "ce_type": "t", "ce_source": "/s"}, "not a UUID"),
        (
            {
                "ce_id": str(uuid.uuid4()),
                "ce_type": "t",
                "ce_source": "/s",
                "ce_specversion": "0.3",
            },
            "ce_specversion",
        ),
        (
            {"ce_id": str(uuid.uuid4()), "ce_type": "t", "ce_source": "/s", "ce_time": "yesterday"},
            "RFC 3339",
        ),
        (
            {
                "ce_id": str(uuid.uuid4()),
                "ce_type": "t",
                "ce_source": "/s",
                "ce_time": "2026-11-23T10:00:00",
            },
            "timezone",
        ),
    ],
)
def test_invalid_envelopes_say_why(headers: dict[str, str], message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        parse_envelope(headers)


def test_payload_errors_distinguish_malformed_json_from_schema_violations() -> None:
    with pytest.raises(PayloadError, match=r"^malformed JSON"):
        decode(StockAdjusted, b"{nope")
    with pytest.raises(PayloadError, match=r"^schema: .*sku"):
        decode(
            StockAdjusted,
            b'{"adjustment_id": "a", "location_id": "l", "kind": "receipt",'
            b' "delta": 1, "occurred_at": "2026-11-23T10:00:00Z"}',
        )
    with pytest.raises(PayloadError, match="empty"):
        decode(StockAdjusted, b"")


def test_required_but_nullable_fields_survive_the_wire() -> None:
    from omni_contracts import OrderPlaced

    anonymous_sale = OrderPlaced(
        order_id="o-1",
        customer_id=None,
        channel="store",
        status="completed",
        lines=[{"sku": "A", "qty": 1, "unit_price": {"amount": "1.00", "currency": "EUR"}}],
        fulfillment={"type": "pickup", "location_id": "store-1"},
    )
    decoded = decode(OrderPlaced, encode(anonymous_sale))
    assert decoded.customer_id is None
    assert decoded == anonymous_sale


# What PostgreSQL's uuid column and the inbox make of an id must be what the envelope says:
# one spelling per event, or the dedup key differs between the lot and the table.
CANONICAL = "3f2b8c1e-9d4a-4f6b-8a2e-7c5d1e0f9a3b"


@pytest.mark.parametrize(
    "ce_id",
    [
        "{" + CANONICAL + "}",  # braces: Python and PostgreSQL take them
        "urn:uuid:" + CANONICAL,  # Python takes it, PostgreSQL refuses it
        CANONICAL.replace("-", ""),  # no hyphens
        "3f2b-8c1e-9d4a-4f6b-8a2e-7c5d-1e0f-9a3b",  # hyphens between other groups
        " " + CANONICAL,  # surrounding white space
        CANONICAL + "\n",
        CANONICAL.replace("3f2b8c1e", "3f2b_8c1"),  # an underscore Python's int() skips
        CANONICAL.replace("3f2b8c1e", "+3f2b8c1"),  # a sign Python's int() takes
        CANONICAL.replace("3f2b8c1e", "\uff13f2b8c1e"),  # a full-width digit
        "00000000-0000-0000-0000-000000000000",  # the nil UUID names no event
        "ffffffff-ffff-ffff-ffff-ffffffffffff",  # nor does the max UUID
    ],
)
def test_a_ce_id_not_in_the_canonical_uuid_form_is_refused(ce_id: str) -> None:
    headers = {"ce_id": ce_id, "ce_type": "t", "ce_source": "/s"}
    with pytest.raises(EnvelopeError, match="ce_id"):
        parse_envelope(headers)


@pytest.mark.parametrize(
    "ce_id",
    [
        CANONICAL,
        CANONICAL.upper(),  # RFC 9562: hex digits are case-insensitive on input
        "018f3b6e-5c2a-7d41-9b3e-2f6a8c0d4e11",  # version 7, time-ordered
        "c232ab00-9414-11ec-b3c8-9f6bdeced846",  # version 1
    ],
)
def test_a_canonical_ce_id_is_taken_in_lower_case(ce_id: str) -> None:
    envelope = parse_envelope({"ce_id": ce_id, "ce_type": "t", "ce_source": "/s"})
    assert envelope.id == ce_id.lower()
    assert envelope.id == str(uuid.UUID(ce_id))  # what PostgreSQL stores and compares


def test_an_envelope_is_never_built_with_a_ce_id_consumers_would_refuse() -> None:
    with pytest.raises(EnvelopeError, match="ce_id"):
        new_envelope(ADJUSTED, source="/a", ce_id="{" + CANONICAL + "}")
    assert new_envelope(ADJUSTED, source="/a", ce_id=CANONICAL.upper()).id == CANONICAL
