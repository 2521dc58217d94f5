"""Notification journeys across the real order, inventory and notification services.

The profile service is not started: its ``customer.profile.updated`` snapshots and
``cart.abandoned`` are published as it would publish them. E-mail lands in the real SMTP
server's Maildir, Web Push at a loopback push service that verifies VAPID and decrypts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from inventory_service.entrypoints.app import create_app as create_inventory
from notification_service.entrypoints.app import create_app as create_notification
from omni_contracts import (
    CartAbandoned,
    CheckoutSubmitted,
    EtaChanged,
    Line,
    Money,
    ProfileUpdated,
    SaleRecorded,
    Shipped,
    StockAdjusted,
    StockAlertRequested,
)
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.plugin import OmniTestEnv, TopicReader, isolated_env
from omni_devkit.testing.push import PushEndpoint
from omni_devkit.testing.services import RunningService, running
from order_service.entrypoints.app import create_app as create_order

pytestmark = pytest.mark.e2e

WAREHOUSE, STORE = "wh-notify", "store-notify"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Platform:
    """The three services, a channel publisher, the lifecycle and notification outcomes."""

    env: OmniTestEnv
    order: RunningService
    inventory: RunningService
    notification: RunningService
    channel: ChannelPublisher
    lifecycle: TopicReader
    outcomes: TopicReader
    push: PushEndpoint

    async def shopper(self, **fields: Any) -> str:
        """A shopper whose profile snapshot the notification service has taken in."""
        customer = uid("cust")
        await self.channel.publish(ProfileUpdated(customer_id=customer, version=1, **fields))

        async def known() -> bool:
            async with self.notification.runtime.pool.acquire() as conn:
                return bool(
                    await conn.fetchval("SELECT 1 FROM contacts WHERE customer_id = $1", customer)
                )

        await until(known)
        return customer

    async def outcome(self, customer: str, ce_type: str, kind: str) -> dict[str, Any]:
        """The next ``ce_type`` outcome of ``kind`` for ``customer``."""
        record = await self.outcomes.next(
            lambda r: (
                record_headers(r)["ce_type"] == ce_type
                and json.loads(r.value)["customer_id"] == customer
                and json.loads(r.value).get("template") == kind
            ),
            timeout=30,
        )
        return json.loads(record.value)


async def until(predicate: Any, timeout: float = 20.0) -> Any:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await predicate()):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
    return value


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def platform(
    kafka_bootstrap: str, postgres_url: str, smtp_server: Any, vapid_keys: Any
) -> AsyncIterator[Platform]:
    """Order, inventory and notification with a warehouse and a store."""
    async with (
        isolated_env(kafka_bootstrap, postgres_url) as env,
        _services(env, smtp_server, vapid_keys) as platform_,
    ):
        for location_id, body in (
            (WAREHOUSE, {"name": "Warehouse", "kind": "warehouse", "ships_online": True}),
            (STORE, {"name": "Store", "kind": "store", "offers_pickup": True}),
        ):
            response = await platform_.inventory.http.put(f"/locations/{location_id}", json=body)
            assert response.status_code in (200, 201), response.text
        yield platform_


@contextlib.asynccontextmanager
async def _services(env: OmniTestEnv, smtp: Any, vapid: Any) -> AsyncIterator[Platform]:
    async with PushEndpoint(vapid_public_key=vapid.public_key) as push:
        notification = create_notification(
            env.settings("notification"),
            smtp_url=smtp.url,
            vapid_private_key_file=str(vapid.private_key_file),
            unsubscribe_secret="an-e2e-secret-of-enough-length",
            notify_push_private_endpoints="allow",  # the push service is on loopback
            notify_dispatch_poll_s=0.1,
            notify_timer_poll_s=0.1,
        )
        async with (
            running(create_inventory(env.settings("inventory"))) as inventory,
            running(create_order(env.settings("order"))) as order,
            running(notification) as notifier,
            ChannelPublisher(env.bootstrap, env.prefix) as channel,
            env.reader("order.lifecycle.v1") as lifecycle,
            env.reader("notification.dispatched.v1") as outcomes,
        ):
            yield Platform(env, order, inventory, notifier, channel, lifecycle, outcomes, push)


def _line(sku: str, price: str = "25.00") -> Line:
    return Line(sku=sku, qty=1, unit_price=Money(amount=Decimal(price), currency="EUR"))


async def _receive(platform: Platform, location_id: str, sku: str, qty: int) -> None:
    await platform.channel.publish(
        StockAdjusted(
            adjustment_id=uid("adj"),
            location_id=location_id,
            sku=sku,
            kind="receipt",
            delta=qty,
            occurred_at=datetime.now(UTC),
        )
    )


async def test_a_late_carrier_reaches_the_shopper_before_they_ask(
    platform: Platform, smtp_server: Any
) -> None:
    address = f"{uid('shopper')}@example.com"
    customer = await platform.shopper(email=address)
    sku = uid("SKU")
    await _receive(platform, WAREHOUSE, sku, 3)
    checkout_id = uid("chk")
    await platform.channel.publish(
        CheckoutSubmitted(
            checkout_id=checkout_id,
            customer_id=customer,
            channel="web",
            lines=[_line(sku)],
            fulfillment={
                "type": "delivery",
                "address": {
                    "line1": "5 Quai",
                    "city": "Nantes",
                    "postal_code": "44000",
                    "country": "FR",
                },
            },
            payment={"reference": uid("pay"), "authorized": {"amount": "25.00", "currency": "EUR"}},
        )
    )
    confirmed = await platform.outcome(customer, "notification.sent", "order_confirmed")
    order_id = (await smtp_server.wait_for(address))[0]["Subject"].split()[2]
    assert confirmed["channel"] == "email"
    promised = datetime.now(UTC) + timedelta(days=1)
    await platform.channel.publish(
        Shipped(order_id=order_id, carrier="dhl", tracking_id=uid("trk"), promised_by=promised)
    )
    await platform.channel.publish(
        EtaChanged(order_id=order_id, eta=promised + timedelta(days=2), carrier="dhl")
    )
    await platform.outcome(customer, "notification.sent", "order_delayed")
    mails = await smtp_server.wait_for(address, 2)
    assert mails[-1]["Subject"] == f"Your order {order_id} is running late"


async def test_a_store_restock_sends_one_back_in_stock_push(platform: Platform) -> None:
    browser = platform.push.subscribe()
    customer = await platform.shopper(
        push_subscriptions=[browser], preferences={"consents": {"push": True}}
    )
    sku = uid("SKU")
    await platform.channel.publish(
        StockAlertRequested(customer_id=customer, sku=sku, location_id=STORE)
    )

    async def signed_up() -> bool:
        async with platform.notification.runtime.pool.acquire() as conn:
            return bool(
                await conn.fetchval("SELECT 1 FROM stock_alerts WHERE customer_id = $1", customer)
            )

    await until(signed_up)
    await _receive(platform, STORE, sku, 4)  # inventory publishes the availability
    (message,) = await platform.push.wait_for(browser, timeout=30)
    assert message.json()["title"] == f"{sku} is back in stock"
    await _receive(platform, STORE, sku, 2)
    await asyncio.sleep(2)
    assert len(platform.push.received(browser)) == 1


async def test_a_cart_bought_at_the_till_meanwhile_is_not_reminded(
    platform: Platform, smtp_server: Any
) -> None:
    address = f"{uid('shopper')}@example.com"
    customer = await platform.shopper(email=address, preferences={"consents": {"email": True}})
    sku = uid("SKU")
    await _receive(platform, STORE, sku, 2)
    await platform.channel.publish(
        SaleRecorded(
            sale_id=uid("sale"),
            location_id=STORE,
            lines=[_line(sku)],
            occurred_at=datetime.now(UTC),
            customer_id=customer,
        )
    )
    # The order service turns the till sale into an order born completed.
    await platform.lifecycle.next(
        lambda r: (
            record_headers(r)["ce_type"] == "order.placed"
            and json.loads(r.value).get("customer_id") == customer
        ),
        timeout=20,
    )

    async def purchase_known() -> bool:
        async with platform.notification.runtime.pool.acquire() as conn:
            return bool(
                await conn.fetchval("SELECT 1 FROM purchases WHERE customer_id = $1", customer)
            )

    await until(purchase_known)
    await platform.channel.publish(
        CartAbandoned(
            cart_id=uid("cart"),
            customer_id=customer,
            channel="web",
            items=[_line(sku)],
            value=Money(amount=Decimal("25.00"), currency="EUR"),
            last_activity_at=datetime.now(UTC) - timedelta(hours=2),
        )
    )
    suppressed = await platform.outcome(customer, "notification.suppressed", "cart_reminder")
    assert suppressed["reason"] == "already_bought"
    assert smtp_server.messages_to(address) == []
