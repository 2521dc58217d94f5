"""Order journeys across the real order and inventory services (real broker and PostgreSQL).

Driven as channel teams would: locations through inventory's API, stock as
``inventory.adjustments.v1`` receipts, checkouts, fulfilment, carrier and return events on
their topics; outcomes read from ``order.lifecycle.v1`` and both services' read APIs. Both
services start once for the module; each story uses its own SKUs, customers and orders.
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
from aiokafka import ConsumerRecord
from inventory_service.entrypoints.app import create_app as create_inventory
from omni_contracts import (
    CheckoutSubmitted,
    Delivered,
    EtaChanged,
    PickedUp,
    ReadyForPickup,
    ReturnReceived,
    SaleRecorded,
    Shipped,
    StockAdjusted,
)
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.plugin import OmniTestEnv, TopicReader, isolated_env
from omni_devkit.testing.services import RunningService, running
from order_service.entrypoints.app import create_app as create_order

pytestmark = pytest.mark.e2e

WAREHOUSE, STORE, OTHER_STORE = "wh-e2e", "store-e2e-1", "store-e2e-2"


def money(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "EUR"}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _type(record: ConsumerRecord) -> str:
    return record_headers(record)["ce_type"]


@dataclass
class Shop:
    """Both services running, a channel publisher and a reader of order.lifecycle.v1."""

    order: RunningService
    inventory: RunningService
    channel: ChannelPublisher
    lifecycle: TopicReader

    async def receive(self, location_id: str, sku: str, qty: int) -> None:
        """Goods arrive at a location; wait until inventory has them."""
        await self.channel.publish(
            StockAdjusted(
                adjustment_id=uid("adj"),
                location_id=location_id,
                sku=sku,
                kind="receipt",
                delta=qty,
                occurred_at=datetime.now(UTC),
            )
        )
        await self.stock(sku, location_id, lambda s: s["on_hand"] >= qty)

    async def stock(
        self, sku: str, location_id: str, until: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """Inventory's view of ``sku`` at ``location_id``, once ``until`` holds (10 s)."""
        return await eventually(lambda: self._stock(sku, location_id), until)

    async def _stock(self, sku: str, location_id: str) -> dict[str, Any]:
        response = await self.inventory.http.get(f"/availability/{sku}")
        assert response.status_code == 200, response.text
        found = [s for s in response.json()["locations"] if s["location_id"] == location_id]
        return found[0] if found else {"on_hand": 0, "reserved": 0, "available": 0}

    def checkout(
        self, sku: str, qty: int, *, pickup: str | None = None, price: str = "25.00"
    ) -> dict[str, Any]:
        """A checkout body of ``qty`` x ``sku`` (delivery unless ``pickup``)."""
        fulfillment = (
            {"type": "pickup", "location_id": pickup}
            if pickup
            else {
                "type": "delivery",
                "address": {
                    "line1": "5 Quai",
                    "city": "Nantes",
                    "postal_code": "44000",
                    "country": "FR",
                },
            }
        )
        total = f"{int(float(price) * qty)}.00"
        return {
            "checkout_id": uid("chk"),
            "customer_id": uid("cust"),
            "channel": "web",
            "lines": [{"sku": sku, "qty": qty, "unit_price": money(price)}],
            "fulfillment": fulfillment,
            "payment": {"reference": uid("pay"), "authorized": money(total)},
        }

    async def submit(self, body: dict[str, Any]) -> str:
        """Publish a checkout; the order id from its order.placed."""
        await self.channel.publish(CheckoutSubmitted(**body))
        record = await self.lifecycle.next(
            lambda r: (
                _type(r) == "order.placed"
                and json.loads(r.value).get("checkout_id") == body["checkout_id"]
            ),
            timeout=20,
        )
        return json.loads(record.value)["order_id"]

    async def event(self, order_id: str, ce_type: str, wait_s: float = 20) -> dict[str, Any]:
        """The next ``ce_type`` event of ``order_id`` on order.lifecycle.v1."""
        record = await self.lifecycle.next(
            lambda r: r.key == order_id.encode() and _type(r) == ce_type, timeout=wait_s
        )
        return json.loads(record.value)

    async def count(self, order_id: str, ce_type: str, wait_s: float = 2) -> int:
        """How many (more) ``ce_type`` events of ``order_id`` arrive within ``wait_s``."""
        found = await self.lifecycle.collect(
            10, wait_s, lambda r: r.key == order_id.encode() and _type(r) == ce_type
        )
        return len(found)

    async def confirmed_order(self, sku: str, qty: int, **kwargs: Any) -> tuple[str, dict]:
        """A checkout placed and confirmed by inventory."""
        order_id = await self.submit(self.checkout(sku, qty, **kwargs))
        return order_id, await self.event(order_id, "order.confirmed")


async def eventually(
    read: Callable[[], Awaitable[dict[str, Any]]],
    until: Callable[[dict[str, Any]], bool],
    wait_s: float = 10,
) -> dict[str, Any]:
    """Poll ``read()`` until ``until`` holds; the last value on timeout (for the assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        value = await read()
        if until(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shop(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[Shop]:
    """The order and inventory services with a warehouse and two stores."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env, _services(env) as shop_:
        for location_id, body in (
            (WAREHOUSE, {"name": "Warehouse", "kind": "warehouse", "ships_online": True}),
            (STORE, {"name": "Store 1", "kind": "store", "offers_pickup": True}),
            (OTHER_STORE, {"name": "Store 2", "kind": "store", "offers_pickup": True}),
        ):
            response = await shop_.inventory.http.put(f"/locations/{location_id}", json=body)
            assert response.status_code in (200, 201), response.text
        yield shop_


@contextlib.asynccontextmanager
async def _services(env: OmniTestEnv) -> AsyncIterator[Shop]:
    async with (
        running(create_inventory(env.settings("inventory"))) as inventory,
        running(create_order(env.settings("order"))) as order,
        ChannelPublisher(env.bootstrap, env.prefix) as channel,
        env.reader("order.lifecycle.v1") as lifecycle,
    ):
        yield Shop(order, inventory, channel, lifecycle)


# -- journeys ----------------------------------------------------------------------------------


async def test_web_delivery_checkout_is_placed_then_confirmed_with_allocations(shop: Shop) -> None:
    sku = uid("SKU")
    await shop.receive(WAREHOUSE, sku, 5)
    order_id, confirmed = await shop.confirmed_order(sku, 2)
    assert confirmed["status"] == "confirmed"
    assert confirmed["allocations"] == [{"sku": sku, "location_id": WAREHOUSE, "qty": 2}]
    stock = await shop.stock(sku, WAREHOUSE, lambda s: s["reserved"] == 2)
    assert (stock["on_hand"], stock["reserved"], stock["available"]) == (5, 2, 3)
    view = (await shop.order.http.get(f"/orders/{order_id}")).json()
    assert view["status"] == "confirmed" and view["allocations"][0]["location_id"] == WAREHOUSE


async def test_pickup_in_store_ready_then_picked_up_takes_the_stock_at_that_store(
    shop: Shop,
) -> None:
    sku = uid("SKU")
    await shop.receive(STORE, sku, 3)
    order_id, confirmed = await shop.confirmed_order(sku, 2, pickup=STORE)
    assert confirmed["allocations"] == [{"sku": sku, "location_id": STORE, "qty": 2}]
    await shop.channel.publish(ReadyForPickup(order_id=order_id, location_id=STORE))
    ready = await shop.event(order_id, "order.ready_for_pickup")
    assert ready["location_id"] == STORE and ready["collect_by"]
    await shop.channel.publish(PickedUp(order_id=order_id, location_id=STORE))
    picked = await shop.event(order_id, "order.picked_up")
    assert picked["status"] == "picked_up"
    stock = await shop.stock(sku, STORE, lambda s: s["on_hand"] == 1)
    assert (stock["on_hand"], stock["reserved"], stock["available"]) == (1, 0, 1)


async def test_a_checkout_for_more_than_available_is_rejected_and_lost_demand_recorded(
    shop: Shop,
) -> None:
    sku = uid("SKU")
    await shop.receive(WAREHOUSE, sku, 1)
    order_id = await shop.submit(shop.checkout(sku, 3, price="40.00"))
    rejected = await shop.event(order_id, "order.rejected")
    assert rejected["shortages"] == [{"sku": sku, "requested": 3, "available": 1}]
    view = (await shop.order.http.get(f"/orders/{order_id}")).json()
    assert view["status"] == "rejected" and view["shortages"][0]["sku"] == sku

    async def lost() -> dict[str, Any]:
        rows = (await shop.inventory.http.get("/lost-demand", params={"limit": 1000})).json()
        return next((row for row in rows if row["sku"] == sku), {})

    row = await eventually(lost, bool)
    assert row["units"] >= 2 and row["fulfillment"] == "delivery"
    stock = await shop.stock(sku, WAREHOUSE, lambda s: True)
    assert stock["reserved"] == 0  # all or nothing


async def test_the_same_checkout_on_the_topic_and_over_http_is_one_order(shop: Shop) -> None:
    sku = uid("SKU")
    await shop.receive(WAREHOUSE, sku, 10)
    body = shop.checkout(sku, 2)
    order_id = await shop.submit(body)
    retried = await shop.order.http.post(
        "/orders", json=body, headers={"Idempotency-Key": body["checkout_id"]}
    )
    assert retried.status_code == 200 and retried.json()["order_id"] == order_id
    await shop.channel.publish(CheckoutSubmitted(**body))  # and once more on the topic
    await shop.event(order_id, "order.confirmed")
    assert await shop.count(order_id, "order.placed") == 0
    stock = await shop.stock(sku, WAREHOUSE, lambda s: s["reserved"] == 2)
    assert stock["reserved"] == 2  # reserved once, not twice
    history = (await shop.order.http.get(f"/customers/{body['customer_id']}/orders")).json()
    assert [o["order_id"] for o in history["orders"]] == [order_id]


async def test_cancel_after_confirmation_releases_stock_and_after_shipping_is_refused(
    shop: Shop,
) -> None:
    sku = uid("SKU")
    await shop.receive(WAREHOUSE, sku, 4)
    order_id, _ = await shop.confirmed_order(sku, 3)
    await shop.stock(sku, WAREHOUSE, lambda s: s["reserved"] == 3)
    response = await shop.order.http.post(
        f"/orders/{order_id}/cancel", json={"reason": "changed my mind"}
    )
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert (await shop.event(order_id, "order.cancelled"))["reason"] == "changed my mind"
    stock = await shop.stock(sku, WAREHOUSE, lambda s: s["reserved"] == 0)
    assert (stock["reserved"], stock["available"]) == (0, 4)

    shipped_id, _ = await shop.confirmed_order(sku, 1)
    await shop.channel.publish(
        Shipped(
            order_id=shipped_id,
            carrier="colissimo",
            tracking_id=uid("trk"),
            promised_by=datetime.now(UTC) + timedelta(days=2),
        )
    )
    await shop.event(shipped_id, "order.shipped")
    stock = await shop.stock(sku, WAREHOUSE, lambda s: s["on_hand"] == 3)
    assert (stock["on_hand"], stock["reserved"]) == (3, 0)  # it left the warehouse
    refused = await shop.order.http.post(f"/orders/{shipped_id}/cancel")
    assert refused.status_code == 409
    assert refused.json()["detail"]["status"] == "shipped"
    assert await shop.count(shipped_id, "order.cancelled") == 0


async def test_a_web_order_returned_in_a_store_restocks_that_store_and_refunds_once(
    shop: Shop,
) -> None:
    sku = uid("SKU")
    await shop.receive(WAREHOUSE, sku, 3)
    order_id, _ = await shop.confirmed_order(sku, 2, price="30.00")
    for event in (
        Shipped(
            order_id=order_id,
            carrier="colissimo",
            tracking_id=uid("trk"),
            promised_by=datetime.now(UTC) + timedelta(days=2),
        ),
        Delivered(order_id=order_id),
    ):
        await shop.channel.publish(event)
    await shop.event(order_id, "order.delivered")
    before = await shop.stock(sku, OTHER_STORE, lambda s: True)

    handed_in = ReturnReceived(
        return_id=uid("ret"),
        order_id=order_id,
        location_id=OTHER_STORE,
        channel="store",
        lines=[{"sku": sku, "qty": 1, "resellable": True}],
        occurred_at=datetime.now(UTC),
    )
    await shop.channel.publish(handed_in)
    await shop.channel.publish(handed_in)  # the till sends it again: one effect
    received = await shop.event(order_id, "order.return_received")
    assert received["location_id"] == OTHER_STORE
    refund = await shop.event(order_id, "order.refund_issued")
    assert refund["amount"] == money("30.00")
    assert await shop.count(order_id, "order.refund_issued") == 0

    stock = await shop.stock(sku, OTHER_STORE, lambda s: s["available"] > before["available"])
    assert stock["available"] == before["available"] + 1
    warehouse = await shop.stock(sku, WAREHOUSE, lambda s: True)
    assert warehouse["on_hand"] == 1  # shipped from there, not returned there
    view = (await shop.order.http.get(f"/orders/{order_id}")).json()
    assert view["status"] == "partially_returned" and view["refunded"] == money("30.00")


async def test_a_carrier_eta_past_the_promise_is_exactly_one_order_delayed(shop: Shop) -> None:
    sku = uid("SKU")
    await shop.receive(WAREHOUSE, sku, 1)
    order_id, _ = await shop.confirmed_order(sku, 1)
    promise = datetime.now(UTC) + timedelta(days=2)
    await shop.channel.publish(
        Shipped(order_id=order_id, carrier="ups", tracking_id=uid("trk"), promised_by=promise)
    )
    late = promise + timedelta(hours=20)
    for eta in (promise - timedelta(hours=3), late, late):  # on time, late, late again
        await shop.channel.publish(EtaChanged(order_id=order_id, eta=eta, carrier="ups"))
    delayed = await shop.event(order_id, "order.delayed")
    assert datetime.fromisoformat(delayed["eta"]) == late
    assert datetime.fromisoformat(delayed["promised_by"]) == promise
    assert await shop.count(order_id, "order.delayed") == 0


async def test_an_in_store_sale_is_a_completed_order_and_reserves_nothing(shop: Shop) -> None:
    sku = uid("SKU")
    await shop.receive(STORE, sku, 5)
    customer = uid("cust")
    sale = SaleRecorded(
        sale_id=uid("sale"),
        location_id=STORE,
        customer_id=customer,
        lines=[{"sku": sku, "qty": 2, "unit_price": money("12.00")}],
        occurred_at=datetime.now(UTC),
    )
    await shop.channel.publish(sale)
    record = await shop.lifecycle.next(
        lambda r: _type(r) == "order.placed" and json.loads(r.value).get("sale_id") == sale.sale_id,
        timeout=20,
    )
    placed = json.loads(record.value)
    assert (placed["status"], placed["channel"]) == ("completed", "store")
    stock = await shop.stock(sku, STORE, lambda s: s["on_hand"] == 3)
    assert (stock["on_hand"], stock["reserved"]) == (3, 0)  # sold once, never reserved
    history = (await shop.order.http.get(f"/customers/{customer}/orders")).json()
    assert [o["sale_id"] for o in history["orders"]] == [sale.sale_id]
