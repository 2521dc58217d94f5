"""Customer journeys across the real customer-profile and order services.

Driven as channel teams would: signals, carts, checkouts and till sales on their topics;
outcomes read from ``customer.profile.v1``, ``cart.abandoned.v1`` and both services' read
APIs and tables. Both services start once for the module; each story uses its own ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from customer_profile_service.entrypoints.app import create_app as create_profile
from customer_profile_service.settings import ProfileSettings
from omni_contracts import (
    CartItemAdded,
    CheckoutSubmitted,
    ContactDetailsUpdated,
    CustomerIdentified,
    ErasureRequested,
)
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.pii import tables_containing
from omni_devkit.testing.plugin import TopicReader, isolated_env
from omni_devkit.testing.services import RunningService, running
from order_service.entrypoints.app import create_app as create_order
from order_service.settings import OrderSettings

pytestmark = pytest.mark.e2e

DELAY_S = 1.5


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def money(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "EUR"}


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    until: Callable[[Any], bool],
    timeout: float = 15.0,  # noqa: ASYNC109
) -> Any:
    """``probe()`` once ``until`` holds for it (polled)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if until(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, f"not reached in time: {value}"
        await asyncio.sleep(0.1)


@dataclass
class Shop:
    """Both services running, a channel publisher and readers of the profile's outputs."""

    profile: RunningService
    order: RunningService
    channel: ChannelPublisher
    profiles: TopicReader
    abandoned: TopicReader

    async def snapshot(self, customer_id: str, ce_type: str = "customer.profile.updated") -> Any:
        record = await self.profiles.next(
            lambda r: r.key == customer_id.encode() and record_headers(r).get("ce_type") == ce_type,
            timeout=15,
        )
        return json.loads(record.value)

    async def order_view(self, order_id: str) -> dict[str, Any]:
        response = await self.order.http.get(f"/orders/{order_id}")
        assert response.status_code == 200, response.text
        return response.json()

    async def orders_of(self, customer_id: str) -> list[dict[str, Any]]:
        response = await self.profile.http.get(f"/customers/{customer_id}/history")
        return response.json()["items"] if response.status_code == 200 else []


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shop(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[Shop]:
    """Customer-profile and order running for this module on one broker and database."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env:
        profile_settings = ProfileSettings.from_settings(
            env.settings("customer-profile"),
            cart_abandonment_delay=timedelta(seconds=DELAY_S),
            cart_timer_poll_s=0.1,
        )
        async with contextlib.AsyncExitStack() as stack:
            profile = await stack.enter_async_context(running(create_profile(profile_settings)))
            order = await stack.enter_async_context(
                running(create_order(OrderSettings.from_settings(env.settings("order"))))
            )
            channel = await stack.enter_async_context(ChannelPublisher(env.bootstrap, env.prefix))
            profiles = await stack.enter_async_context(env.reader("customer.profile.v1"))
            abandoned = await stack.enter_async_context(env.reader("cart.abandoned.v1"))
            yield Shop(profile, order, channel, profiles, abandoned)


async def test_a_checkout_through_the_order_service_files_the_order_and_cancels_the_cart(
    shop: Shop,
) -> None:
    customer, cart = uid("cust"), uid("cart")
    await shop.channel.publish(CustomerIdentified(customer_id=customer, anonymous_id=uid("dev")))
    await shop.snapshot(customer)
    items = [{"sku": "SKU-J", "qty": 2, "unit_price": money("12.00")}]
    await shop.channel.publish(
        CartItemAdded(
            cart_id=cart,
            channel="web",
            customer_id=customer,
            items=items,
            occurred_at=datetime.now(UTC),
        )
    )
    await shop.channel.publish(
        CheckoutSubmitted(
            checkout_id=uid("chk"),
            customer_id=customer,
            channel="web",
            lines=items,
            fulfillment={"type": "pickup", "location_id": "store-e2e"},
            payment={"reference": uid("pay"), "authorized": money("24.00")},
            cart_id=cart,
        )
    )
    history = await eventually(lambda: shop.orders_of(customer), lambda items: len(items) == 1)
    assert history[0]["order_id"].startswith("ord_") and history[0]["status"] == "placed"
    assert history[0]["total"] == money("24.00")
    found = await shop.abandoned.collect(1, DELAY_S + 2, lambda r: r.key == cart.encode())
    assert found == []


async def test_erasure_leaves_no_personal_data_in_profile_or_order(shop: Shop) -> None:
    customer = uid("cust")
    email, phone = f"{customer}@mail.example", "+33 6 98 76 54 32"
    street, recipient, recipient_phone = "17 Rue des Secrets", "Camille Privée", "+33 1 23 45 67 89"
    await shop.channel.publish(CustomerIdentified(customer_id=customer, anonymous_id=uid("dev")))
    await shop.channel.publish(
        ContactDetailsUpdated(customer_id=customer, email=email, phone=phone)
    )
    await shop.snapshot(customer)
    await shop.channel.publish(
        CheckoutSubmitted(
            checkout_id=uid("chk"),
            customer_id=customer,
            channel="web",
            lines=[{"sku": "SKU-K", "qty": 1, "unit_price": money("40.00")}],
            fulfillment={
                "type": "delivery",
                "address": {
                    "line1": street,
                    "city": "Lyon",
                    "postal_code": "69002",
                    "country": "FR",
                    "recipient": recipient,
                    "phone": recipient_phone,
                },
            },
            payment={"reference": uid("pay"), "authorized": money("40.00")},
        )
    )
    history = await eventually(lambda: shop.orders_of(customer), lambda items: len(items) == 1)
    order_id = history[0]["order_id"]
    assert (await shop.order_view(order_id))["fulfillment"]["address"]["line1"] == street

    await shop.channel.publish(ErasureRequested(customer_id=customer, request_id=uid("gdpr")))
    await shop.snapshot(customer, "customer.profile.erased")
    view = await eventually(
        lambda: shop.order_view(order_id), lambda v: v["fulfillment"].get("address") is None
    )
    # The accounts keep the order and its amounts.
    assert view["total"] == money("40.00") and view["customer_id"] == customer

    # No read API answers with the shopper's data...
    assert (await shop.profile.http.get(f"/customers/{customer}")).status_code == 404
    lookup = await shop.profile.http.get("/customers/lookup", params={"email": email})
    assert lookup.status_code == 404
    assert street not in json.dumps(view) and recipient not in json.dumps(view)
    # ...and no table of either service holds it (the outbox included).
    needles = [email, phone, "+33698765432", street, recipient, recipient_phone]
    for svc in (shop.profile, shop.order):
        async with svc.runtime.pool.acquire() as conn:
            assert await tables_containing(conn, svc.runtime.settings.schema, needles) == {}
