"""Loyalty journeys across the real order, inventory and loyalty services (real broker and
PostgreSQL), with loyalty in the checkout saga.

Driven as channel teams would: till sales on ``store.sales.v1``, checkouts, fulfilment and
returns on their topics, profiles on ``customer.profile.v1`` as customer-profile publishes
them; outcomes read from ``loyalty.ledger.v1``, ``order.lifecycle.v1`` and the read APIs.
The return window is 3 seconds here, so pending points become spendable within a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import ConsumerRecord
from inventory_service.entrypoints.app import create_app as create_inventory
from loyalty_service.entrypoints.app import create_app as create_loyalty
from loyalty_service.settings import LoyaltySettings
from omni_contracts import (
    CheckoutSubmitted,
    OrderCancellationRequested,
    PickedUp,
    ProfileUpdated,
    ReturnReceived,
    SaleRecorded,
    StockAdjusted,
)
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.plugin import OmniTestEnv, TopicReader, isolated_env
from omni_devkit.testing.services import RunningService, running
from order_service.entrypoints.app import create_app as create_order
from order_service.settings import OrderSettings

pytestmark = pytest.mark.e2e

WAREHOUSE, STORE = "wh-loy", "store-loy-1"
WINDOW_S = 3.0
POINTS_PER_EUR = 10  # and a point is worth 0.01 EUR: 100 points = 1.00 EUR


def money(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "EUR"}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _type(record: ConsumerRecord) -> str:
    return record_headers(record)["ce_type"]


async def eventually(
    read: Callable[[], Awaitable[Any]], until: Callable[[Any], bool], wait_s: float = 15
) -> Any:
    """Poll ``read()`` until ``until`` holds; the last value on timeout (for the assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        value = await read()
        if until(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(0.05)


@dataclass
class Shop:
    """Three services, a channel publisher, readers of the lifecycle and the ledger."""

    order: RunningService
    inventory: RunningService
    loyalty: RunningService
    channel: ChannelPublisher
    lifecycle: TopicReader
    ledger: TopicReader

    async def receive(self, location_id: str, sku: str, qty: int) -> None:
        """Goods arrive; wait until inventory has them."""
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

        async def stock() -> int:
            response = await self.inventory.http.get(f"/availability/{sku}")
            rows = [r for r in response.json()["locations"] if r["location_id"] == location_id]
            return rows[0]["on_hand"] if rows else 0

        assert await eventually(stock, lambda n: n >= qty) >= qty

    async def reserved(self, sku: str, location_id: str) -> int:
        response = await self.inventory.http.get(f"/availability/{sku}")
        rows = [r for r in response.json()["locations"] if r["location_id"] == location_id]
        return rows[0]["reserved"] if rows else 0

    async def sale(
        self,
        lines: list[tuple[str, int, str]],
        *,
        customer_id: str | None = None,
        card: str | None = None,
    ) -> str:
        """A till sale; the order id order gives it."""
        sale = SaleRecorded(
            sale_id=uid("sale"),
            location_id=STORE,
            lines=[{"sku": s, "qty": q, "unit_price": money(p)} for s, q, p in lines],
            occurred_at=datetime.now(UTC),
            customer_id=customer_id,
            loyalty_card=card,
        )
        await self.channel.publish(sale)
        record = await self.lifecycle.next(
            lambda r: (
                _type(r) == "order.placed" and json.loads(r.value).get("sale_id") == sale.sale_id
            ),
            timeout=20,
        )
        return json.loads(record.value)["order_id"]

    async def account(self, customer_id: str) -> dict[str, Any]:
        response = await self.loyalty.http.get(f"/accounts/{customer_id}")
        return response.json() if response.status_code == 200 else {}

    async def account_until(
        self, customer_id: str, until: Callable[[dict[str, Any]], bool], wait_s: float = 15
    ) -> dict[str, Any]:
        return await eventually(
            lambda: self.account(customer_id), lambda a: bool(a) and until(a), wait_s
        )

    async def fund(self, customer_id: str, points: int) -> None:
        """Give a shopper ``points`` spendable points (a till sale, then the window)."""
        euros = f"{points / POINTS_PER_EUR:.2f}"
        before = (await self.account(customer_id)).get("available", 0)
        await self.sale([(uid("FUND"), 1, euros)], customer_id=customer_id)
        account = await self.account_until(
            customer_id, lambda a: a["available"] >= before + points, wait_s=WINDOW_S + 15
        )
        assert account["available"] == before + points, account

    async def entry(
        self, customer_id: str, ce_type: str, order_id: str | None = None, wait_s: float = 15
    ) -> dict[str, Any]:
        """The next ``ce_type`` ledger event of ``customer_id`` (about ``order_id``)."""
        record = await self.ledger.next(
            lambda r: (
                r.key == customer_id.encode()
                and _type(r) == ce_type
                and (order_id is None or json.loads(r.value).get("order_id") == order_id)
            ),
            timeout=wait_s,
        )
        return json.loads(record.value)

    def checkout(
        self, customer_id: str, sku: str, qty: int, price: str, *, authorized: str, points: int
    ) -> dict[str, Any]:
        return {
            "checkout_id": uid("chk"),
            "customer_id": customer_id,
            "channel": "web",
            "lines": [{"sku": sku, "qty": qty, "unit_price": money(price)}],
            "fulfillment": {"type": "pickup", "location_id": STORE},
            "payment": {"reference": uid("pay"), "authorized": money(authorized)},
            "points_to_redeem": points,
        }

    async def submit(self, body: dict[str, Any]) -> str:
        await self.channel.publish(CheckoutSubmitted(**body))
        record = await self.lifecycle.next(
            lambda r: (
                _type(r) == "order.placed"
                and json.loads(r.value).get("checkout_id") == body["checkout_id"]
            ),
            timeout=20,
        )
        return json.loads(record.value)["order_id"]

    async def outcome(self, order_id: str, wait_s: float = 20) -> dict[str, Any]:
        """order.confirmed or order.rejected of ``order_id``."""
        record = await self.lifecycle.next(
            lambda r: (
                r.key == order_id.encode() and _type(r) in ("order.confirmed", "order.rejected")
            ),
            timeout=wait_s,
        )
        return {"type": _type(record), **json.loads(record.value)}

    async def event(self, order_id: str, ce_type: str, wait_s: float = 20) -> dict[str, Any]:
        record = await self.lifecycle.next(
            lambda r: r.key == order_id.encode() and _type(r) == ce_type, timeout=wait_s
        )
        return json.loads(record.value)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shop(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[Shop]:
    """Order (loyalty in the saga), inventory with a warehouse and a store, and loyalty."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env, _services(env) as shop_:
        for location_id, body in (
            (WAREHOUSE, {"name": "Warehouse", "kind": "warehouse", "ships_online": True}),
            (STORE, {"name": "Store", "kind": "store", "offers_pickup": True}),
        ):
            response = await shop_.inventory.http.put(f"/locations/{location_id}", json=body)
            assert response.status_code in (200, 201), response.text
        yield shop_


@contextlib.asynccontextmanager
async def _services(env: OmniTestEnv) -> AsyncIterator[Shop]:
    order_settings = OrderSettings.from_settings(env.settings("order"), loyalty_in_saga=True)
    loyalty_settings = LoyaltySettings.from_settings(
        env.settings("loyalty"),
        loyalty_pending_days=WINDOW_S / 86400,
        loyalty_points_per_unit=POINTS_PER_EUR,
        loyalty_timer_poll_s=0.1,
    )
    async with (
        running(create_inventory(env.settings("inventory"))) as inventory,
        running(create_order(order_settings)) as order,
        running(create_loyalty(loyalty_settings)) as loyalty,
        ChannelPublisher(env.bootstrap, env.prefix) as channel,
        env.reader("order.lifecycle.v1") as lifecycle,
        env.reader("loyalty.ledger.v1") as ledger,
    ):
        yield Shop(order, inventory, loyalty, channel, lifecycle, ledger)


# -- earning ---------------------------------------------------------------------------------


async def test_a_card_collects_in_store_and_its_points_move_when_the_profile_links_it(
    shop: Shop,
) -> None:
    card, customer = uid("CARD"), uid("cust")
    await shop.sale([(uid("SKU"), 2, "12.50")], card=card)  # 25.00 EUR -> 250 points
    assert (await shop.loyalty.http.get(f"/accounts/{customer}")).status_code == 404
    await shop.channel.publish(ProfileUpdated(customer_id=customer, loyalty_card=card))
    account = await shop.account_until(customer, lambda a: a["available"] == 250, WINDOW_S + 10)
    assert (account["available"], account["pending"], account["lifetime"]) == (250, 0, 250)
    ledger = (await shop.loyalty.http.get(f"/accounts/{customer}/ledger")).json()["entries"]
    moved = [e for e in ledger if e["reason"] == "card_linked"]
    assert sum(e["points"] for e in moved) == 250
    # Published under the customer (the card's own account told nobody).
    event = await shop.entry(
        customer,
        "loyalty.points.pending" if moved[-1]["kind"] == "pending" else "loyalty.points.earned",
    )
    assert event["reason"] == "card_linked"
    # A second snapshot of the same profile moves nothing again.
    await shop.channel.publish(ProfileUpdated(customer_id=customer, loyalty_card=card))
    await shop.sale([(uid("SKU"), 1, "1.00")], card=card)  # the card now earns for the customer
    account = await shop.account_until(customer, lambda a: a["lifetime"] == 260)
    assert account["lifetime"] == 260


async def test_pending_points_become_available_after_the_window_and_a_redelivery_is_one_entry(
    shop: Shop,
) -> None:
    customer = uid("cust")
    sale = SaleRecorded(
        sale_id=uid("sale"),
        location_id=STORE,
        lines=[{"sku": uid("SKU"), "qty": 1, "unit_price": money("7.99")}],
        occurred_at=datetime.now(UTC),
        customer_id=customer,
    )
    envelope = await shop.channel.publish(sale)
    await shop.channel.publish(sale, envelope=envelope)  # the till sent it twice
    pending = await shop.entry(customer, "loyalty.points.pending")
    assert pending["points"] == 79 and pending["balance"] == 0  # rounded down, not spendable
    account = await shop.account(customer)
    assert (account["pending"], account["available"]) == (79, 0)
    account = await shop.account_until(customer, lambda a: a["available"] == 79, WINDOW_S + 10)
    assert (account["pending"], account["available"], account["lifetime"]) == (0, 79, 79)
    ledger = (await shop.loyalty.http.get(f"/accounts/{customer}/ledger")).json()
    assert [e["kind"] for e in ledger["entries"]] == ["available", "pending"]
    assert account["next_expiry"] is not None


async def test_a_partial_return_before_the_window_closes_reverses_those_points_only(
    shop: Shop,
) -> None:
    customer = uid("cust")
    shirt, socks = uid("SHIRT"), uid("SOCKS")
    order_id = await shop.sale([(shirt, 2, "20.00"), (socks, 1, "5.00")], customer_id=customer)
    await shop.account_until(customer, lambda a: a["pending"] == 450)
    await shop.channel.publish(
        ReturnReceived(
            return_id=uid("ret"),
            order_id=order_id,
            location_id=STORE,
            channel="store",
            lines=[{"sku": shirt, "qty": 1, "resellable": True}],
            occurred_at=datetime.now(UTC),
        )
    )
    reversed_ = await shop.entry(customer, "loyalty.points.reversed")
    assert reversed_["points"] == -200 and reversed_["order_id"] == order_id
    account = await shop.account_until(customer, lambda a: a["available"] == 250, WINDOW_S + 10)
    # The returned shirt's points never became spendable; the rest did.
    assert (account["available"], account["pending"], account["lifetime"]) == (250, 0, 250)


# -- the saga --------------------------------------------------------------------------------


async def test_redeem_at_checkout_holds_then_redeems_and_a_partial_return_gives_back_in_proportion(
    shop: Shop,
) -> None:
    customer, sku = uid("cust"), uid("SKU")
    await shop.fund(customer, 1000)
    await shop.receive(STORE, sku, 5)
    # 2 x 10.00 = 20.00 due: 10.00 paid, 1000 points (10.00) redeemed
    body = shop.checkout(customer, sku, 2, "10.00", authorized="10.00", points=1000)
    order_id = await shop.submit(body)
    held = await shop.entry(customer, "loyalty.points.held")
    assert held["points"] == -1000 and held["balance"] == 0
    assert held["value"] == money("10.00") and held["order_id"] == order_id
    confirmed = await shop.outcome(order_id)
    assert confirmed["type"] == "order.confirmed"
    redeemed = await shop.entry(customer, "loyalty.points.redeemed")
    assert redeemed["points"] == 0 and redeemed["order_id"] == order_id
    account = await shop.account_until(customer, lambda a: a["held"] == 0)
    assert (account["available"], account["held"]) == (0, 0)

    await shop.channel.publish(PickedUp(order_id=order_id, location_id=STORE))
    earned = await shop.entry(customer, "loyalty.points.pending", order_id)
    assert earned["points"] == 100  # earned on the 10.00 paid in money, not on the points
    await shop.channel.publish(
        ReturnReceived(
            return_id=uid("ret"),
            order_id=order_id,
            location_id=STORE,
            channel="store",
            lines=[{"sku": sku, "qty": 1, "resellable": True}],
            occurred_at=datetime.now(UTC),
        )
    )
    taken = await shop.entry(customer, "loyalty.points.reversed", order_id)
    given = await shop.entry(customer, "loyalty.points.reversed", order_id)
    assert taken["points"] == -50  # half the units: half the points earned on them
    assert given["points"] == 500 and given["reason"] == "redeemed_on_returned_items"
    refund = await shop.event(order_id, "order.refund_issued")
    assert refund["amount"] == money("5.00")  # half of what was paid in money
    account = await shop.account_until(customer, lambda a: a["available"] == 550, WINDOW_S + 10)
    assert (account["available"], account["pending"]) == (550, 0)


async def test_more_points_than_available_rejects_the_order_and_releases_its_stock(
    shop: Shop,
) -> None:
    customer, sku = uid("cust"), uid("SKU")
    await shop.fund(customer, 300)
    await shop.receive(WAREHOUSE, sku, 3)
    body = shop.checkout(customer, sku, 1, "10.00", authorized="5.00", points=500)
    body["fulfillment"] = {
        "type": "delivery",
        "address": {"line1": "1 Rue", "city": "Lyon", "postal_code": "69001", "country": "FR"},
    }
    order_id = await shop.submit(body)
    refused = await shop.entry(customer, "loyalty.points.refused")
    assert refused["reason"] == "insufficient_points" and refused["requested"] == 500
    rejected = await shop.outcome(order_id)
    assert rejected["type"] == "order.rejected" and rejected["reason"] == "insufficient_points"
    assert await eventually(lambda: shop.reserved(sku, WAREHOUSE), lambda n: n == 0) == 0
    assert (await shop.account(customer))["available"] == 300  # untouched

    stranger = uid("cust")
    order_id = await shop.submit(
        shop.checkout(stranger, sku, 1, "10.00", authorized="5.00", points=500)
    )
    refused = await shop.entry(stranger, "loyalty.points.refused")
    assert refused["reason"] == "unknown_member"
    assert (await shop.outcome(order_id))["type"] == "order.rejected"


async def test_points_worth_less_than_the_unpaid_rest_reject_the_order_and_release_them(
    shop: Shop,
) -> None:
    customer, sku = uid("cust"), uid("SKU")
    await shop.fund(customer, 200)
    await shop.receive(STORE, sku, 2)
    # 10.00 due, 5.00 authorised, 200 points are 2.00: 3.00 uncovered
    order_id = await shop.submit(
        shop.checkout(customer, sku, 1, "10.00", authorized="5.00", points=200)
    )
    rejected = await shop.outcome(order_id)
    assert rejected["type"] == "order.rejected" and rejected["reason"] == "payment_insufficient"
    released = await shop.entry(customer, "loyalty.points.released")
    assert released["points"] == 200 and released["balance"] == 200
    assert await eventually(lambda: shop.reserved(sku, STORE), lambda n: n == 0) == 0


async def test_cancelling_a_confirmed_order_gives_the_points_back(shop: Shop) -> None:
    customer, sku = uid("cust"), uid("SKU")
    await shop.fund(customer, 400)
    await shop.receive(STORE, sku, 2)
    order_id = await shop.submit(
        shop.checkout(customer, sku, 1, "10.00", authorized="6.00", points=400)
    )
    assert (await shop.outcome(order_id))["type"] == "order.confirmed"
    await shop.account_until(customer, lambda a: a["held"] == 0 and a["available"] == 0)
    await shop.channel.publish(
        OrderCancellationRequested(order_id=order_id, channel="web", reason="changed_mind")
    )
    await shop.event(order_id, "order.cancelled")
    released = await shop.entry(customer, "loyalty.points.released")
    assert released["points"] == 400 and released["order_id"] == order_id
    account = await shop.account_until(customer, lambda a: a["available"] == 400)
    assert (account["available"], account["held"]) == (400, 0)


async def test_two_checkouts_spending_the_same_points_at_once_one_wins(shop: Shop) -> None:
    customer, sku = uid("cust"), uid("SKU")
    await shop.fund(customer, 500)
    await shop.receive(STORE, sku, 4)
    bodies = [
        shop.checkout(customer, sku, 1, "10.00", authorized="5.00", points=500) for _ in range(2)
    ]
    bodies[1]["channel"] = "app"
    await asyncio.gather(*(shop.channel.publish(CheckoutSubmitted(**b)) for b in bodies))
    outcomes = []
    for body in bodies:
        record = await shop.lifecycle.next(
            lambda r, b=body: (
                _type(r) == "order.placed"
                and json.loads(r.value).get("checkout_id") == b["checkout_id"]
            ),
            timeout=20,
        )
        outcomes.append((await shop.outcome(json.loads(record.value)["order_id"]))["type"])
    assert sorted(outcomes) == ["order.confirmed", "order.rejected"]
    account = await shop.account_until(customer, lambda a: a["held"] == 0)
    assert (account["available"], account["held"]) == (0, 0)


# -- offers ----------------------------------------------------------------------------------


async def test_an_offer_goes_only_to_an_item_bought_together_that_is_in_stock(
    shop: Shop,
) -> None:
    tent, pegs, lamp = uid("TENT"), uid("PEGS"), uid("LAMP")
    await shop.receive(WAREHOUSE, pegs, 5)  # pegs ship online; the lamp is nowhere in stock
    for _ in range(3):  # other shoppers buy the tent with the lamp more often than with pegs
        await shop.sale([(tent, 1, "80.00"), (lamp, 1, "15.00")])
    await shop.sale([(tent, 1, "80.00"), (pegs, 1, "4.00")])

    # Sales and stock arrive on different topics and partitions: wait until loyalty has
    # learnt all four baskets and the pegs' stock before the shopper's sale asks for an offer.
    async def learnt() -> tuple[int, int]:
        async with shop.loyalty.runtime.pool.acquire() as conn:
            baskets = await conn.fetchval(
                "SELECT coalesce(sum(n), 0)::int FROM cooccurrence WHERE sku = $1", tent
            )
            stocked = await conn.fetchval(
                "SELECT count(*)::int FROM stock WHERE sku = $1 AND online_available > 0", pegs
            )
        return baskets, stocked

    baskets, stocked = await eventually(learnt, lambda v: v[0] == 4 and v[1] > 0)
    assert baskets == 4 and stocked > 0, (baskets, stocked)
    customer = uid("cust")
    await shop.sale([(tent, 1, "80.00")], customer_id=customer)
    offer = await shop.entry(customer, "loyalty.offer.issued")
    assert offer["sku"] == pegs and offer["reward"] and offer["valid_until"]
    account = await shop.account(customer)
    assert account["open_offer"]["sku"] == pegs
    # One open offer per shopper: the next purchase brings no second one.
    await shop.sale([(tent, 1, "80.00")], customer_id=customer)
    await shop.account_until(customer, lambda a: a["lifetime"] == 1600)
    assert (
        await shop.ledger.collect(
            1, 1.0, lambda r: r.key == customer.encode() and _type(r) == "loyalty.offer.issued"
        )
        == []
    )
