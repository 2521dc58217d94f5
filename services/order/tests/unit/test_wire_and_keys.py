"""Small pure helpers: idempotency fingerprints, page cursors, the null customer on the wire."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from omni_contracts import CheckoutSubmitted
from order_service.entrypoints.views import decode_cursor, encode_cursor
from order_service.service.orders import checkout_fingerprint

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def a_checkout(**overrides) -> CheckoutSubmitted:
    data = {
        "checkout_id": "chk-1",
        "customer_id": "cust-1",
        "channel": "web",
        "lines": [{"sku": "A", "qty": 1, "unit_price": {"amount": "9.9", "currency": "EUR"}}],
        "fulfillment": {"type": "pickup", "location_id": "store-1"},
        "payment": {"reference": "p", "authorized": {"amount": "9.90", "currency": "EUR"}},
    }
    return CheckoutSubmitted(**(data | overrides))


def test_a_resubmitted_checkout_has_the_same_fingerprint_a_changed_one_not() -> None:
    first = a_checkout(occurred_at=NOW)
    assert checkout_fingerprint(first) == checkout_fingerprint(a_checkout(checkout_id="other"))
    changed = a_checkout(fulfillment={"type": "pickup", "location_id": "store-2"})
    assert checkout_fingerprint(first) != checkout_fingerprint(changed)


def test_cursors_round_trip_and_garbage_is_refused() -> None:
    class _Order:
        placed_at = NOW
        order_id = "ord_1"

    cursor = decode_cursor(encode_cursor(_Order()))  # type: ignore[arg-type]
    assert (cursor.placed_at, cursor.order_id) == (NOW, "ord_1")
    with pytest.raises(ValueError):
        decode_cursor("not-a-cursor")
