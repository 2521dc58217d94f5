"""The customer-profile service against the real broker and PostgreSQL.

The test publishes what channels (and the order service) would publish and reads
``customer.profile.v1``, ``cart.abandoned.v1`` and the dead-letter topics as consumers
would. The service starts once for the module with a short ``CART_ABANDONMENT_DELAY``;
tests stay independent through their own ids.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import ConsumerRecord
from customer_profile_service.entrypoints.app import create_app
from customer_profile_service.settings import ProfileSettings
from omni_contracts import (
    CartCheckedOut,
    CartItemAdded,
    CartViewed,
    CheckoutSubmitted,
    ContactDetailsUpdated,
    CustomerIdentified,
    ErasureRequested,
    Line,
    Money,
    OrderPlaced,
    OrderShipped,
    PreferencesUpdated,
    SaleRecorded,
)
from omni_devkit.testing.events import ChannelPublisher, ce_headers, record_headers
from omni_devkit.testing.pii import tables_containing
from omni_devkit.testing.plugin import TopicReader, isolated_env
from omni_devkit.testing.services import RunningService, running

pytestmark = pytest.mark.integration

DELAY_S = 1.5
PROFILE, ABANDONED = "customer.profile.v1", "cart.abandoned.v1"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def now() -> datetime:
    return datetime.now(UTC)


def line(sku: str, qty: int = 1, price: str = "10.00") -> Line:
    return Line(sku=sku, qty=qty, unit_price=Money(amount=Decimal(price), currency="EUR"))


def _type(record: ConsumerRecord) -> str | None:
    return record_headers(record).get("ce_type")


@dataclass
class World:
    """The running service, a channel publisher and readers of its outputs."""

    svc: RunningService
    channel: ChannelPublisher
    profile: TopicReader
    abandoned: TopicReader
    reader: Callable[..., TopicReader]

    async def profile_event(
        self, customer_id: str, ce_type: str = "customer.profile.updated", wait_s: float = 10
    ) -> dict[str, Any]:
        """The next ``ce_type`` event keyed by ``customer_id`` on customer.profile.v1."""
        record = await self.profile.next(
            lambda r: r.key == customer_id.encode() and _type(r) == ce_type, timeout=wait_s
        )
        return json.loads(record.value)

    async def abandonment(self, cart_id: str, wait_s: float = DELAY_S + 20) -> dict[str, Any]:
        """The cart.abandoned of ``cart_id``."""
        record = await self.abandoned.next(lambda r: r.key == cart_id.encode(), timeout=wait_s)
        return json.loads(record.value)

    async def no_abandonment(self, cart_id: str, wait_s: float = DELAY_S + 2) -> None:
        """Assert that ``cart_id`` is not announced (within the delay and some)."""
        found = await self.abandoned.collect(1, wait_s, lambda r: r.key == cart_id.encode())
        assert found == [], f"unexpected abandonment of {cart_id}"

    async def identify(self, customer_id: str, anonymous_id: str | None = None) -> None:
        """Log a shopper in (on a fresh device unless given) and wait for their snapshot."""
        await self.channel.publish(
            CustomerIdentified(customer_id=customer_id, anonymous_id=anonymous_id or uid("dev"))
        )
        await self.profile_event(customer_id)

    async def customer(self, customer_id: str, status: int = 200) -> dict[str, Any]:
        """GET /customers/{customer_id}."""
        response = await self.svc.http.get(f"/customers/{customer_id}")
        assert response.status_code == status, response.text
        return response.json()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the service's metrics registry (0 when absent)."""
        registry = self.svc.runtime.metrics.registry
        return registry.get_sample_value(name, {"service": "customer-profile", **labels}) or 0.0

    async def until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Poll an (async) predicate until truthy."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def w(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[World]:
    """The service running for this module, a channel and readers of its outputs."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env:
        settings = ProfileSettings.from_settings(
            env.settings("customer-profile"),
            cart_abandonment_delay=timedelta(seconds=DELAY_S),
            cart_timer_poll_s=0.1,
            cart_max_lines=50,
        )
        async with (
            running(create_app(settings)) as svc,
            ChannelPublisher(env.bootstrap, env.prefix) as channel,
            env.reader(PROFILE) as profile,
            env.reader(ABANDONED) as abandoned,
        ):
            yield World(svc, channel, profile, abandoned, env.reader)


# -- carts -------------------------------------------------------------------------------------


async def test_an_anonymous_cart_is_abandoned_to_the_customer_who_logs_in(w: World) -> None:
    device, customer, cart = uid("dev"), uid("cust"), uid("cart")
    skipped = w.metric("omni_cart_abandonments_skipped_total", reason="already_announced")
    await w.channel.publish(
        CartItemAdded(
            cart_id=cart,
            channel="web",
            anonymous_id=device,
            items=[line("SKU-A", 2), line("SKU-B", 1, "5.50")],
            occurred_at=now(),
        )
    )
    await w.channel.publish(CustomerIdentified(customer_id=customer, anonymous_id=device))
    snapshot = await w.profile_event(customer)
    assert snapshot["anonymous_ids"] == [device]

    abandoned = await w.abandonment(cart)
    assert abandoned["customer_id"] == customer and abandoned["channel"] == "web"
    assert abandoned["value"] == {"amount": "25.50", "currency": "EUR"}
    assert [(i["sku"], i["qty"]) for i in abandoned["items"]] == [("SKU-A", 2), ("SKU-B", 1)]
    assert w.metric("omni_cart_abandoned_total", channel="web") >= 1

    # Looking at the same cart again re-arms its timer, but the same contents are never
    # announced twice.
    await w.channel.publish(
        CartViewed(
            cart_id=cart,
            channel="web",
            anonymous_id=device,
            items=[line("SKU-A", 2), line("SKU-B", 1, "5.50")],
            occurred_at=now(),
        )
    )
    await w.no_abandonment(cart)
    assert (
        w.metric("omni_cart_abandonments_skipped_total", reason="already_announced") == skipped + 1
    )


async def test_a_checkout_cancels_the_abandonment(w: World) -> None:
    customer, cart = uid("cust"), uid("cart")
    await w.identify(customer)
    before = w.metric("omni_cart_abandonments_skipped_total", reason="checked_out")
    await w.channel.publish(
        CartItemAdded(
            cart_id=cart,
            channel="app",
            customer_id=customer,
            items=[line("SKU-C")],
            occurred_at=now(),
        )
    )
    await w.channel.publish(
        CheckoutSubmitted(
            checkout_id=uid("chk"),
            customer_id=customer,
            channel="app",
            lines=[line("SKU-C")],
            fulfillment={"type": "pickup", "location_id": "store-1"},
            payment={"reference": "pay", "authorized": {"amount": "10.00", "currency": "EUR"}},
            cart_id=cart,
        )
    )
    await w.until(
        lambda: w.metric("omni_cart_abandonments_skipped_total", reason="checked_out") == before + 1
    )
    await w.no_abandonment(cart)

    # The channel's own cart.checked_out (after the checkout) changes nothing more.
    await w.channel.publish(
        CartCheckedOut(
            cart_id=cart,
            channel="app",
            customer_id=customer,
            items=[line("SKU-C")],
            occurred_at=now(),
        )
    )
    await w.no_abandonment(cart, wait_s=0.5)


async def test_buying_the_items_in_a_store_with_the_loyalty_card_cancels(w: World) -> None:
    customer, cart, card = uid("cust"), uid("cart"), uid("card")
    await w.identify(customer)
    # A first till sale names both: the card becomes the customer's.
    await w.channel.publish(
        SaleRecorded(
            sale_id=uid("sale"),
            location_id="store-7",
            lines=[line("SKU-OLD")],
            occurred_at=now(),
            customer_id=customer,
            loyalty_card=card,
        )
    )
    assert (await w.profile_event(customer))["loyalty_cards"] == [card]
    before = w.metric("omni_cart_abandonments_skipped_total", reason="purchased")
    await w.channel.publish(
        CartItemAdded(
            cart_id=cart,
            channel="web",
            customer_id=customer,
            items=[line("SKU-D", 1, "30.00")],
            occurred_at=now(),
        )
    )
    await asyncio.sleep(0.2)
    # The shopper buys it at the till, showing only the card.
    sale_id = uid("sale")
    await w.channel.publish(
        SaleRecorded(
            sale_id=sale_id,
            location_id="store-7",
            lines=[line("SKU-D", 1, "30.00")],
            occurred_at=now(),
            loyalty_card=card,
        )
    )
    await w.until(
        lambda: w.metric("omni_cart_abandonments_skipped_total", reason="purchased") == before + 1
    )
    await w.no_abandonment(cart)
    history = (await w.svc.http.get(f"/customers/{customer}/history")).json()
    assert history["items"][0]["sale_id"] == sale_id
    assert history["items"][0]["channel"] == "store"
    assert (await w.customer(customer))["summary"]["preferred_store"] == "store-7"


async def test_a_burst_of_orders_ends_as_if_they_came_one_by_one(w: World) -> None:
    """Orders arriving together are handled as a lot: every shopper still ends known, with
    every purchase, the store they buy at most, and no reminder of a cart they bought."""
    shoppers = [uid("cust") for _ in range(4)]
    carts = {c: uid("cart") for c in shoppers}
    before = w.metric("omni_cart_abandonments_skipped_total", reason="purchased")
    for c in shoppers:
        await w.channel.publish(
            CartItemAdded(
                cart_id=carts[c],
                channel="web",
                customer_id=c,
                items=[line("SKU-LOT")],
                occurred_at=now() - timedelta(seconds=1),
            )
        )
    # Carts and orders travel on different topics: the carts are in before the burst.
    for c in shoppers:
        await w.profile_event(c)
    orders: list[tuple[str, OrderPlaced]] = []
    for c in shoppers:
        for store in ("store-2", "store-5", "store-2"):
            order = OrderPlaced(
                order_id=uid("ord"),
                customer_id=c,
                channel="web",
                lines=[line("SKU-LOT")],
                fulfillment={"type": "pickup", "location_id": store},
                occurred_at=now(),
            )
            orders.append((c, order))
    await asyncio.gather(*(w.channel.publish(o) for _, o in orders))
    shipped = orders[0][1].order_id
    await w.channel.publish(OrderShipped(order_id=shipped, customer_id=shoppers[0], channel="web"))

    async def all_kept() -> bool:
        for c in shoppers:
            page = (await w.svc.http.get(f"/customers/{c}/history?limit=10")).json()
            if len(page.get("items", [])) != 3:
                return False
        return True

    await w.until(all_kept, timeout=20)
    # Other tests' carts can be bought meanwhile: the count only has to cover these four.
    await w.until(
        lambda: (
            w.metric("omni_cart_abandonments_skipped_total", reason="purchased")
            >= before + len(shoppers)
        )
    )
    for c in shoppers:
        view = await w.customer(c)
        assert view["summary"]["orders"] == 3
        assert view["summary"]["preferred_store"] == "store-2"

    async def moved() -> bool:
        page = (await w.svc.http.get(f"/customers/{shoppers[0]}/history?limit=10")).json()
        return {i["order_id"]: i["status"] for i in page["items"]}[shipped] == "shipped"

    await w.until(moved)
    for c in shoppers:
        await w.no_abandonment(carts[c], wait_s=0.2)


# -- identity ----------------------------------------------------------------------------------


async def test_a_shared_device_never_merges_two_known_customers(w: World) -> None:
    tablet, first, second = uid("tablet"), uid("cust"), uid("cust")
    before = w.metric(
        "omni_profile_identifiers_skipped_total", kind="anonymous_id", reason="shared_device"
    )
    await w.identify(first, tablet)
    await w.identify(second, tablet)
    assert (await w.customer(first))["identifiers"]["anonymous_ids"] == [tablet]
    second_view = await w.customer(second)
    assert second_view["customer_id"] == second
    assert second_view["identifiers"]["anonymous_ids"] == []
    assert (
        w.metric(
            "omni_profile_identifiers_skipped_total", kind="anonymous_id", reason="shared_device"
        )
        == before + 1
    )
    merged = await w.profile.collect(
        1, 1.0, lambda r: _type(r) == "customer.profiles.merged" and r.key == first.encode()
    )
    assert merged == []

    # Two customers with their own e-mail (one per profile) sharing a loyalty card: the
    # limit stops the merge, the card stays with its first holder.
    card = uid("card")
    for customer, email in ((first, f"{first}@example.com"), (second, f"{second}@example.com")):
        await w.channel.publish(
            ContactDetailsUpdated(customer_id=customer, email=email, email_verified=True)
        )
        await w.profile_event(customer)
    for customer in (first, second):
        await w.channel.publish(
            SaleRecorded(
                sale_id=uid("sale"),
                location_id="store-2",
                lines=[line("SKU-E")],
                occurred_at=now(),
                customer_id=customer,
                loyalty_card=card,
            )
        )
    await w.until(
        lambda: (
            w.metric(
                "omni_profile_identifiers_skipped_total",
                kind="loyalty_card",
                reason="identifier_limit",
            )
            >= 1
        )
    )
    assert (await w.customer(second))["customer_id"] == second
    assert (await w.customer(first))["identifiers"]["loyalty_cards"] == [card]


async def test_a_merge_republishes_the_survivor(w: World) -> None:
    older, newer, card = uid("cust"), uid("cust"), uid("card")
    older_device, newer_device = uid("dev"), uid("dev")
    await w.identify(older, older_device)
    await w.channel.publish(
        SaleRecorded(
            sale_id=uid("sale"),
            location_id="store-3",
            lines=[line("SKU-F")],
            occurred_at=now(),
            customer_id=older,
            loyalty_card=card,
        )
    )
    await w.profile_event(older)
    await w.identify(newer, newer_device)
    await w.channel.publish(ContactDetailsUpdated(customer_id=newer, phone="+33 6 12 34 56 78"))
    await w.profile_event(newer)
    # The newer profile shows the older one's card at the till: one shopper.
    await w.channel.publish(
        SaleRecorded(
            sale_id=uid("sale"),
            location_id="store-3",
            lines=[line("SKU-G")],
            occurred_at=now(),
            customer_id=newer,
            loyalty_card=card,
        )
    )
    merged = await w.profile_event(older, "customer.profiles.merged")
    assert merged["surviving_id"] == older and merged["merged_ids"] == [newer]
    survivor = await w.profile_event(older)
    assert sorted(survivor["anonymous_ids"]) == sorted([older_device, newer_device])
    assert survivor["phone"] == "+33612345678" and survivor["loyalty_cards"] == [card]
    tombstone = await w.profile.next(lambda r: r.key == newer.encode() and r.value is None)
    assert tombstone.value is None
    view = await w.customer(newer)
    assert view["customer_id"] == older and view["merged_ids"] == [newer]
    assert view["summary"]["orders"] == 2
    # Signals for the merged id reach the survivor.
    await w.channel.publish(
        PreferencesUpdated(customer_id=newer, preferences={"language": "fr", "time_zone": "UTC"})
    )
    assert (await w.profile_event(older))["preferences"]["language"] == "fr"
    assert w.metric("omni_profile_merges_total") >= 1


# -- read API ----------------------------------------------------------------------------------


async def test_history_summary_and_lookup(w: World) -> None:
    customer = uid("cust")
    await w.identify(customer)
    await w.channel.publish(
        ContactDetailsUpdated(
            customer_id=customer,
            email=f"  {customer.upper()}@Example.com ",
            email_verified=True,
            push_subscription={
                "endpoint": "https://push.example.net/sub/1",
                "keys": {"p256dh": "BPk", "auth": "a1"},
            },
        )
    )
    await w.channel.publish(
        PreferencesUpdated(
            customer_id=customer,
            preferences={"preferred_channel": "push", "consents": {"push": True}},
        )
    )
    await w.channel.publish(
        PreferencesUpdated(customer_id=customer, preferences={"consents": {"email": False}})
    )
    base = now() - timedelta(days=3)
    order_ids = [uid("ord") for _ in range(3)]
    for n, order_id in enumerate(order_ids):
        await w.channel.publish(
            OrderPlaced(
                order_id=order_id,
                customer_id=customer,
                channel="web" if n != 1 else "call_center",
                lines=[line(f"SKU-{n}", 2, "7.25")],
                fulfillment={"type": "pickup", "location_id": "store-9"},
                occurred_at=base + timedelta(days=n),
            )
        )
    await w.channel.publish(
        OrderShipped(order_id=order_ids[2], customer_id=customer, channel="web")
    )

    async def shipped() -> bool:
        page = (await w.svc.http.get(f"/customers/{customer}/history?limit=10")).json()
        return bool(page["items"]) and page["items"][0]["status"] == "shipped"

    async def signals_applied() -> bool:
        # Signals and orders travel on different topics: no order holds between them.
        prefs = (await w.customer(customer))["preferences"]
        return prefs["consents"]["email"] is False

    await w.until(shipped)
    await w.until(signals_applied)
    first = (await w.svc.http.get(f"/customers/{customer}/history?limit=2")).json()
    assert [i["order_id"] for i in first["items"]] == [order_ids[2], order_ids[1]]
    assert first["items"][1]["channel"] == "call_center"
    second = (
        await w.svc.http.get(f"/customers/{customer}/history?limit=2&cursor={first['next_cursor']}")
    ).json()
    assert [i["order_id"] for i in second["items"]] == [order_ids[0]]
    assert second["next_cursor"] is None

    view = await w.customer(customer)
    assert view["summary"]["orders"] == 3
    assert view["summary"]["spend"] == [{"amount": "43.50", "currency": "EUR"}]
    assert view["summary"]["preferred_store"] == "store-9"
    assert view["contact"]["email"] == f"{customer}@example.com"
    assert view["contact"]["push_subscriptions"][0]["endpoint"].endswith("/sub/1")
    prefs = view["preferences"]
    assert prefs["preferred_channel"] == "push"
    assert prefs["consents"] == {"email": False, "push": True, "sms": None}

    found = await w.svc.http.get("/customers/lookup", params={"email": f"{customer}@EXAMPLE.com"})
    assert found.status_code == 200 and found.json()["customer_id"] == customer
    assert (await w.svc.http.get("/customers/lookup", params={"phone": "+1000"})).status_code == 404
    assert (await w.svc.http.get("/customers/lookup")).status_code == 400
    assert (await w.svc.http.get(f"/customers/{customer}/history?cursor=zz")).status_code == 400
    assert (await w.svc.http.get("/customers/nobody")).status_code == 404
    anonymous = await w.svc.http.get(f"/customers/{customer}", headers={"Authorization": ""})
    assert anonymous.status_code == 401


# -- bad signals -------------------------------------------------------------------------------


async def test_bad_signals_are_dead_lettered_with_a_reason(w: World) -> None:
    signals_dlq = w.reader("customer.signals.v1.dlq")
    carts_dlq = w.reader("cart.events.v1.dlq")
    known = uid("cust")
    await w.identify(known)

    ghost = uid("ghost")
    unknown = await w.channel.publish(ContactDetailsUpdated(customer_id=ghost, email="a@b.io"))
    bad_email = await w.channel.publish(ContactDetailsUpdated(customer_id=known, email="not-mail"))
    placeholder = await w.channel.publish(ContactDetailsUpdated(customer_id=known, phone="000000"))
    bad_zone = await w.channel.publish(
        PreferencesUpdated(customer_id=known, preferences={"time_zone": "Mars/Olympus"})
    )
    contradictory = ce_headers("customer.contact.updated")
    await w.channel.publish_raw(
        "customer.signals.v1",
        json.dumps({"customer_id": known, "email": "x@y.io", "cleared": ["email"]}).encode(),
        key=known,
        headers=contradictory,
    )
    huge = await w.channel.publish(
        CartItemAdded(
            cart_id=uid("cart"),
            channel="web",
            customer_id=known,
            items=[line(f"SKU-{n}") for n in range(51)],
            occurred_at=now(),
        )
    )

    async def reason(reader: TopicReader, ce_id: str) -> tuple[str, str]:
        record = await reader.next(lambda r: record_headers(r).get("ce_id") == ce_id, timeout=10)
        headers = record_headers(record)
        return headers["dlq_reason"], headers["dlq_error"]

    assert (await reason(signals_dlq, bad_email.id))[0] == "invalid_contact"
    assert (await reason(signals_dlq, placeholder.id))[0] == "blocked_identifier"
    assert (await reason(signals_dlq, bad_zone.id))[0] == "invalid_preferences"
    why, error = await reason(signals_dlq, contradictory["ce_id"])
    assert why == "schema_violation" and "both set and cleared" in error
    why, error = await reason(carts_dlq, huge.id)
    assert why == "cart_too_large" and "51 lines" in error
    # The partition goes on: the next signal is handled.
    await w.channel.publish(PreferencesUpdated(customer_id=known, preferences={"language": "de"}))
    assert (await w.profile_event(known))["preferences"]["language"] == "de"
    # A contact update is a sign-up: it starts the profile of a shopper never seen before.
    assert unknown.id and (await w.customer(ghost))["contact"]["email"] == "a@b.io"


# -- erasure -----------------------------------------------------------------------------------


async def test_erasure_leaves_no_personal_data(w: World) -> None:
    customer, device, cart = uid("cust"), uid("dev"), uid("cart")
    email, phone = f"{customer}@mail.example", "+44 20 7946 0958"
    await w.identify(customer, device)
    await w.channel.publish(
        ContactDetailsUpdated(customer_id=customer, email=email, phone=phone, email_verified=True)
    )
    await w.profile_event(customer)
    await w.channel.publish(
        CartItemAdded(
            cart_id=cart,
            channel="web",
            customer_id=customer,
            items=[line("SKU-H")],
            occurred_at=now(),
        )
    )
    await w.channel.publish(
        OrderPlaced(
            order_id=uid("ord"),
            customer_id=customer,
            channel="web",
            lines=[line("SKU-I")],
            fulfillment={"type": "pickup", "location_id": "store-1"},
        )
    )

    async def in_history() -> bool:
        page = (await w.svc.http.get(f"/customers/{customer}/history")).json()
        return len(page["items"]) == 1

    await w.until(in_history)
    await w.channel.publish(ErasureRequested(customer_id=customer, request_id=uid("gdpr")))
    await w.profile_event(customer, "customer.profile.erased")
    tombstone = await w.profile.next(lambda r: r.key == customer.encode() and r.value is None)
    assert tombstone.value is None
    await w.no_abandonment(cart)

    await w.customer(customer, status=404)
    lookup = await w.svc.http.get("/customers/lookup", params={"email": email})
    assert lookup.status_code == 404
    assert (await w.svc.http.get(f"/customers/{customer}/history")).status_code == 404
    needles = [email, "+442079460958", phone, device]
    assert await _tables_containing(w.svc, needles) == {}
    # A late signal does not rebuild the profile.
    late = await w.channel.publish(ContactDetailsUpdated(customer_id=customer, email=email))
    dlq = w.reader("customer.signals.v1.dlq")
    record = await dlq.next(lambda r: record_headers(r).get("ce_id") == late.id)
    assert record_headers(record)["dlq_reason"] == "erased_customer"
    assert await _tables_containing(w.svc, needles) == {}


async def _tables_containing(svc: RunningService, needles: list[str]) -> dict[str, str]:
    async with svc.runtime.pool.acquire() as conn:
        return await tables_containing(conn, svc.runtime.settings.schema, needles)
