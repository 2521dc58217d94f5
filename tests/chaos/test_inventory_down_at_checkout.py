"""Inventory is down when a checkout comes: the order times out, and the late hold goes.

The order is rejected with reason ``reservation_timeout`` instead of staying placed forever;
when inventory comes back it reserves the stock for the placed order and releases it again
on the rejection that follows in the same partition: nothing stays held.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from inventory_service.entrypoints.app import create_app as create_inventory
from inventory_service.settings import InventorySettings
from omni_contracts import CheckoutSubmitted, StockAdjusted
from omni_devkit.testing.chaos import Figures, wait_for
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.services import running
from order_service.entrypoints.app import create_app as create_order
from order_service.settings import OrderSettings

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

WAREHOUSE = {
    "name": "Warehouse",
    "kind": "warehouse",
    "ships_online": True,
    "offers_pickup": False,
    "safety_stock": 0,
    "low_stock_threshold": 1,
}


def checkout(qty: int) -> CheckoutSubmitted:
    return CheckoutSubmitted(
        checkout_id=f"chk-{uuid.uuid4().hex[:8]}",
        customer_id="cust-1",
        channel="web",
        lines=[{"sku": "KETTLE", "qty": qty, "unit_price": {"amount": "5.00", "currency": "EUR"}}],
        fulfillment={
            "type": "delivery",
            "address": {"line1": "1 Rue", "city": "Lyon", "postal_code": "69001", "country": "FR"},
        },
        payment={
            "reference": "pay-1",
            "authorized": {"amount": f"{5 * qty}.00", "currency": "EUR"},
        },
    )


async def test_inventory_down_at_checkout_times_the_order_out_and_releases_the_late_hold(
    omni_env,
) -> None:
    figures = Figures("inventory down at checkout")
    inv_settings = InventorySettings.from_settings(
        omni_env.settings("inventory"), inventory_timer_poll_s=0.1
    )
    order_settings = OrderSettings.from_settings(
        omni_env.settings("order"), timer_poll_interval_s=0.1, order_reservation_timeout_s=2
    )
    lifecycle = omni_env.reader("order.lifecycle.v1")
    async with ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel, lifecycle:
        async with running(create_inventory(inv_settings)) as inventory:
            await inventory.http.put("/locations/wh-1", json=WAREHOUSE)
            await channel.publish(
                StockAdjusted(
                    adjustment_id="adj-1",
                    location_id="wh-1",
                    sku="KETTLE",
                    kind="receipt",
                    delta=5,
                    occurred_at=datetime.now(UTC),
                )
            )

            async def stocked() -> bool:
                return (
                    await inventory.runtime.pool.fetchval(
                        "SELECT on_hand FROM stock WHERE sku = 'KETTLE'"
                    )
                    == 5
                )

            await wait_for(stocked, timeout=20)
        # Inventory is down now.
        async with running(create_order(order_settings)):
            await channel.publish(checkout(2))
            figures.sent = 1
            rejected = await lifecycle.next(
                lambda r: record_headers(r)["ce_type"] == "order.rejected", timeout=20
            )
            assert json.loads(rejected.value)["reason"] == "reservation_timeout"
            back_at = time.monotonic()
            async with running(create_inventory(inv_settings)) as inventory:
                pool = inventory.runtime.pool

                async def released() -> bool:
                    state = await pool.fetchval("SELECT state FROM reservations")
                    return state in ("released", "rejected")

                await wait_for(released, timeout=30)
                figures.recovered_s = time.monotonic() - back_at
                row = await pool.fetchrow(
                    "SELECT on_hand, reserved FROM stock WHERE sku = 'KETTLE'"
                )
                figures.applied = 1
                figures.extra["reserved_after"] = row["reserved"]
        figures.report()
        assert (row["on_hand"], row["reserved"]) == (5, 0)
