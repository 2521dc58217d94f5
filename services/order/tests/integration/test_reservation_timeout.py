"""An order that never gets a reservation answer is rejected after the timeout."""

from __future__ import annotations

import json
import uuid

import pytest
from omni_contracts import CheckoutSubmitted, ReservationConfirmed
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.services import running
from order_service.entrypoints.app import create_app
from order_service.settings import OrderSettings

pytestmark = pytest.mark.integration


def checkout() -> CheckoutSubmitted:
    return CheckoutSubmitted(
        checkout_id=f"chk-{uuid.uuid4().hex[:8]}",
        customer_id="cust-1",
        channel="web",
        lines=[{"sku": "SKU-1", "qty": 1, "unit_price": {"amount": "5.00", "currency": "EUR"}}],
        fulfillment={
            "type": "delivery",
            "address": {"line1": "1 Rue", "city": "Lyon", "postal_code": "69001", "country": "FR"},
        },
        payment={"reference": "pay-1", "authorized": {"amount": "5.00", "currency": "EUR"}},
    )


async def test_no_reservation_answer_rejects_the_order_and_a_late_answer_changes_nothing(
    omni_env,
) -> None:
    settings = OrderSettings.from_settings(
        omni_env.settings("order"), timer_poll_interval_s=0.1, order_reservation_timeout_s=1.5
    )
    lifecycle = omni_env.reader("order.lifecycle.v1")
    async with (
        running(create_app(settings)) as order,
        ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel,
        lifecycle,
    ):
        await channel.publish(checkout())  # inventory never answers
        placed = await lifecycle.next(lambda r: record_headers(r)["ce_type"] == "order.placed")
        order_id = json.loads(placed.value)["order_id"]
        rejected = await lifecycle.next(
            lambda r: record_headers(r)["ce_type"] == "order.rejected", timeout=15
        )
        body = json.loads(rejected.value)
        assert (body["order_id"], body["reason"]) == (order_id, "reservation_timeout")
        view = (await order.http.get(f"/orders/{order_id}")).json()
        assert view["status"] == "rejected"

        # Inventory answers at last: the order stays rejected (the rejection released it).
        await channel.publish(
            ReservationConfirmed(
                order_id=order_id,
                allocations=[{"sku": "SKU-1", "location_id": "wh-1", "qty": 1}],
                expires_at="2030-01-01T00:00:00Z",
            )
        )
        assert await lifecycle.collect(1, timeout=2) == []
        assert (await order.http.get(f"/orders/{order_id}")).json()["status"] == "rejected"
        assert not await order.runtime.pool.fetchval("SELECT count(*) FROM timers")
