"""``omni bench loyalty`` end to end, at a tiny scale, against in-process services."""

from __future__ import annotations

import httpx
import pytest
from inventory_service.entrypoints.app import create_app as create_inventory
from loyalty_service.entrypoints.app import create_app as create_loyalty
from loyalty_service.settings import LoyaltySettings
from omni_devkit.bench.kit import StackTarget
from omni_devkit.bench.loyalty import measure
from omni_devkit.testing.services import running
from order_service.entrypoints.app import create_app as create_order
from order_service.settings import OrderSettings

pytestmark = pytest.mark.integration


async def test_the_loyalty_bench_measures_the_ledger_and_both_checkout_phases(omni_env) -> None:
    order_settings = OrderSettings.from_settings(omni_env.settings("order"), loyalty_in_saga=True)
    loyalty_settings = LoyaltySettings.from_settings(
        omni_env.settings("loyalty"), loyalty_pending_days=0, loyalty_timer_poll_s=0.1
    )
    async with (
        running(create_inventory(omni_env.settings("inventory"))) as inventory,
        running(create_order(order_settings)),
        running(create_loyalty(loyalty_settings)),
    ):
        target = StackTarget(
            bootstrap=omni_env.bootstrap,
            urls={"inventory": "http://inventory"},
            api_key="test-key",
            topic_prefix=omni_env.prefix,
        )
        result = await measure(
            target,
            entries=30,
            checkouts=10,
            say=lambda _: None,
            inventory_transport=httpx.ASGITransport(app=inventory.app),
        )
    figures = result.as_json()
    assert figures["entries"] == 30 and figures["checkouts"] == 10
    assert figures["ledger_entries_per_s"] > 0 and figures["raw_messages_per_s"] > 0
    assert figures["checkouts_per_s_with_loyalty"] > 0
    assert figures["checkouts_per_s_without_loyalty"] > 0
    # Every checkout of both phases was confirmed: stock and points were there.
    assert figures["confirmed_with_loyalty"] == figures["confirmed_without_loyalty"] == 10
