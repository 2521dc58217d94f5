"""``omni demo``: the omnichannel stories, played as channel teams would drive them.

Each story publishes what a till, a web site, a store or a carrier would publish (CloudEvents
on the contract topics) and reads outcomes where web and app read them (the availability
stream, the services' read APIs), narrating each step and checking each outcome. A story
whose service is not part of the stack is skipped with the reason, never failed: the stories
of services still to come switch on by themselves when those services run.

Short timers (a pickup not collected, a cart abandoned) come from the environment the dev
stack passes to the services (:data:`DEMO_TIMERS`); against a stack with production timers
the stories that would wait for days say so and skip.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
from omni_contracts import (
    CartItemAdded,
    Consents,
    ContactDetailsUpdated,
    CustomerIdentified,
    Delivered,
    EtaChanged,
    Line,
    Money,
    Preferences,
    PreferencesUpdated,
    ReadyForPickup,
    ReturnReceived,
    SaleRecorded,
    Shipped,
    StockAdjusted,
)

from omni_devkit.testing.events import ChannelPublisher

Say = Callable[[str], None]

DEMO_TIMERS = {
    # A pickup not collected is cancelled after about 9 s instead of 7 days.
    "PICKUP_COLLECT_DAYS": "0.0001",
    "TIMER_POLL_INTERVAL_S": "0.2",
    # A cart untouched for 5 s counts as abandoned (customer-profile; default one hour).
    "CART_ABANDONMENT_DELAY": "5",
    "CART_TIMER_POLL_S": "0.2",
    # Points earned become spendable after about 4 s instead of the 14-day return window.
    "LOYALTY_PENDING_DAYS": "0.00005",
    "LOYALTY_TIMER_POLL_S": "0.2",
    # A shopper's contact budget renews over 20 s instead of a day: stories that tell the
    # same shopper several things see a reminder wait for room in seconds, not be held a day.
    "NOTIFY_BUDGET_WINDOW_HOURS": "0.0055",
}
"""Environment the dev stack gives its services so the stories' timers fire in seconds."""


@dataclass(frozen=True)
class Shopper:
    """A demo shopper (no real person: the console may show these)."""

    customer_id: str
    name: str
    email: str
    loyalty_card: str
    prefers: str = "email"


SHOPPERS = (
    Shopper("demo-alice", "Alice (prefers e-mail)", "alice@example.com", "LC-ALICE-001"),
    Shopper("demo-bob", "Bob (prefers push)", "bob@example.com", "LC-BOB-002", "push"),
)

STORIES: dict[int, str] = {
    1: "a store sells its last unit: web and app see it out of stock",
    2: "buy online, pick up in store; a pickup not collected is cancelled and restocked",
    3: "bought online, returned in another store: that store's stock goes up, one refund",
    4: "a cart left on the web site brings an e-mail; bought in a store instead: no reminder",
    5: "points earned at a till with a loyalty card, spent in the app",
    6: "a carrier's ETA slips past the promise: the shopper is told before asking",
    7: "demand lost to stock-outs, biggest first, with revenue",
}
ORDER = (1, 2, 3, 7, 4, 5, 6)


class StoryFailed(Exception):
    """An outcome of a story did not hold."""


class StorySkipped(Exception):
    """A story cannot be played against this stack (a service is missing, timers are long)."""


def price(amount: str) -> Money:
    """Euros."""
    return Money(amount=Decimal(amount), currency="EUR")


def uid(prefix: str) -> str:
    """A unique id with a readable prefix."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Stack:
    """The running stack as a channel team reaches it: topics and read APIs."""

    def __init__(self, env: Mapping[str, str], channel: ChannelPublisher) -> None:
        self.env = env
        self.channel = channel
        self.http = httpx.AsyncClient(
            timeout=10, headers={"Authorization": f"Bearer {env.get('API_KEY', '')}"}
        )
        self._routes: dict[str, set[str]] = {}

    def url(self, service: str) -> str | None:
        """Where ``service`` answers (None: not part of this stack)."""
        return self.env.get(service.upper().replace("-", "_") + "_URL")

    async def needs(self, *wanted: str | tuple[str, str]) -> None:
        """Skip the story unless every service it drives runs and is ready.

        A ``(service, route)`` pair names the read API the story uses, for the message.
        """
        for item in wanted:
            service, route = item if isinstance(item, tuple) else (item, None)
            url = self.url(service)
            what = f"the {service} service is not running" + (
                f" (for GET {route})" if route else ""
            )
            if url is None:
                raise StorySkipped(what)
            if service not in self._routes:
                try:
                    ready = (await self.http.get(f"{url}/readyz")).status_code == 200
                except httpx.HTTPError:
                    ready = False
                self._routes[service] = {"ready"} if ready else set()
            if not self._routes[service]:
                raise StorySkipped(what)

    async def get(self, service: str, path: str, **params: Any) -> Any:
        """A read API's JSON (raises on an error status)."""
        response = await self.http.get(f"{self.url(service)}{path}", params=params or None)
        if response.status_code >= 400:
            raise StoryFailed(f"{service} GET {path}: {response.status_code} {response.text[:200]}")
        return response.json()

    async def post(self, service: str, path: str, body: dict[str, Any]) -> Any:
        """POST to a service's API (raises on an error status)."""
        response = await self.http.post(f"{self.url(service)}{path}", json=body)
        if response.status_code >= 400:
            raise StoryFailed(
                f"{service} POST {path}: {response.status_code} {response.text[:200]}"
            )
        return response.json()

    async def level(self, sku: str, location_id: str) -> dict[str, Any]:
        """``sku`` at ``location_id`` as inventory's read API tells it."""
        data = await self.get("inventory", f"/availability/{sku}")
        for entry in data["locations"]:
            if entry["location_id"] == location_id:
                return entry
        return {"available": 0, "on_hand": 0, "status": "out_of_stock"}

    async def order(self, order_id: str) -> dict[str, Any]:
        """An order as order's read API tells it."""
        return await self.get("order", f"/orders/{order_id}")  # type: ignore[no-any-return]

    async def checkout(
        self, shopper: Shopper, sku: str, qty: int, unit: str, *, pickup: str | None = None
    ) -> str:
        """A web checkout over order's API; returns the order id."""
        fulfillment: dict[str, Any] = (
            {"type": "pickup", "location_id": pickup}
            if pickup
            else {
                "type": "delivery",
                "address": {
                    "line1": "1 Demo Street",
                    "city": "Lyon",
                    "postal_code": "69001",
                    "country": "FR",
                },
            }
        )
        total = Decimal(unit) * qty
        body = {
            "checkout_id": uid("demo-chk"),
            "customer_id": shopper.customer_id,
            "channel": "web",
            "lines": [{"sku": sku, "qty": qty, "unit_price": {"amount": unit, "currency": "EUR"}}],
            "fulfillment": fulfillment,
            "payment": {
                "reference": uid("demo-pay"),
                "authorized": {"amount": str(total), "currency": "EUR"},
            },
        }
        created = await self.post("order", "/orders", body)
        return str(created["order_id"])

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.http.aclose()


async def until(
    check: Callable[[], Awaitable[Any]],
    what: str,
    timeout: float = 20.0,  # noqa: ASYNC109
    every: float = 0.1,
) -> Any:
    """Poll ``check`` until it returns something truthy; :class:`StoryFailed` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StoryFailed(f"{what} did not happen within {timeout:g} s")
        await asyncio.sleep(every)


async def _restock(stack: Stack, sku: str, location_id: str, counted: int) -> None:
    """A stock count at ``location_id`` (as the store's handheld would send it)."""
    await stack.channel.publish(
        StockAdjusted(
            adjustment_id=uid("demo-count"),
            location_id=location_id,
            sku=sku,
            kind="count",
            counted=counted,
            occurred_at=datetime.now(UTC),
        )
    )

    async def counted_now() -> bool:
        return (await stack.level(sku, location_id))["on_hand"] == counted

    await until(counted_now, f"the count of {sku} at {location_id}")


async def _watch_stream(
    url: str, sku: str, location_id: str, ready: asyncio.Event, seen: dict[str, float], who: str
) -> None:
    """Follow the availability stream as a web page does; note when it shows out of stock."""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=60)) as client,
        client.stream(
            "GET", f"{url}/availability/stream", params={"sku": sku, "location_id": location_id}
        ) as response,
    ):
        if response.status_code != 200:
            raise StoryFailed(f"the availability stream answered {response.status_code}")
        async for line in response.aiter_lines():
            if line.startswith("event: ready"):
                ready.set()
            elif line.startswith("data: {"):
                data = json.loads(line[6:])
                if data.get("status") == "out_of_stock":
                    seen[who] = time.perf_counter()
                    return


async def story_last_unit(stack: Stack, say: Say) -> None:
    """1: the last unit sold at a till; web and app (two stream clients) see it go."""
    await stack.needs("inventory")
    sku, store = "SHOES-RUN-42", "store-017"
    say(f"the airport store ({store}) counts exactly one pair of {sku} on the shelf")
    await _restock(stack, sku, store, 1)
    url = stack.url("inventory")
    assert url is not None
    seen: dict[str, float] = {}
    readies = {who: asyncio.Event() for who in ("web", "app")}
    watchers = [
        asyncio.create_task(_watch_stream(url, sku, store, readies[who], seen, who))
        for who in readies
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies.values())), 10)
        say("the web site and the app follow the availability stream")
        sale = SaleRecorded(
            sale_id=uid("demo-sale"),
            location_id=store,
            lines=[Line(sku=sku, qty=1, unit_price=price("89.00"))],
            occurred_at=datetime.now(UTC),
        )
        sold_at = time.perf_counter()
        await stack.channel.publish(sale)
        say("the till sells the last pair")
        await asyncio.wait_for(asyncio.gather(*watchers), 10)
    except TimeoutError:
        raise StoryFailed("web and app did not see the sell-out within 10 s") from None
    finally:
        for task in watchers:
            task.cancel()
    took = {who: (at - sold_at) * 1000 for who, at in seen.items()}
    say(f"web saw it out of stock after {took['web']:.0f} ms, the app after {took['app']:.0f} ms")
    level = await stack.level(sku, store)
    if level["status"] != "out_of_stock":
        raise StoryFailed(f"inventory says {level['status']} after the last sale")


async def story_pickup_not_collected(stack: Stack, say: Say) -> None:
    """2: a pickup order is packed, nobody comes: cancelled, the units go back on sale."""
    await stack.needs("inventory", "order")
    shopper, sku, store = SHOPPERS[0], "TSHIRT-BLUE-M", "store-002"
    await _restock(stack, sku, store, 4)
    before = (await stack.level(sku, store))["available"]
    order_id = await stack.checkout(shopper, sku, 1, "19.90", pickup=store)
    say(f"{shopper.name} orders a t-shirt online to pick up at {store} ({order_id})")

    def status_is(wanted: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return bool((await stack.order(order_id))["status"] == wanted)

        return check

    await until(status_is("confirmed"), "the reservation")
    held = (await stack.level(sku, store))["available"]
    say(f"inventory holds the unit: {before} -> {held} available at {store}")
    if held != before - 1:
        raise StoryFailed(f"expected {before - 1} available while reserved, saw {held}")
    await stack.channel.publish(ReadyForPickup(order_id=order_id, location_id=store))
    await until(status_is("ready_for_pickup"), "ready for pickup")
    say("the store packs it: ready for pickup; nobody comes ...")
    try:
        await until(status_is("cancelled"), "the not-collected cancellation", timeout=40)
    except StoryFailed:
        raise StorySkipped(
            "the pickup window of this stack is longer than the demo waits: start the stack "
            "with PICKUP_COLLECT_DAYS=0.0001 (as `omni dev up` and `omni demo --start` do)"
        ) from None
    say("the pickup window passed: the order is cancelled")

    async def restocked() -> bool:
        return bool((await stack.level(sku, store))["available"] == before)

    await until(restocked, "the restock")
    say(f"and the unit is back on sale: {before} available at {store}")


async def story_returned_elsewhere(stack: Stack, say: Say) -> None:
    """3: an online order returned in another store: that store restocks, one refund."""
    await stack.needs("inventory", "order")
    shopper, sku, store = SHOPPERS[1], "TSHIRT-BLUE-M", "store-017"
    order_id = await stack.checkout(shopper, sku, 1, "19.90")
    say(f"{shopper.name} orders a t-shirt online for delivery ({order_id})")

    async def status_in(*wanted: str) -> Any:
        order = await stack.order(order_id)
        return order if order["status"] in wanted else None

    await until(lambda: status_in("confirmed"), "the confirmation")
    for event in (
        Shipped(
            order_id=order_id,
            carrier="demo-post",
            tracking_id=uid("trk"),
            promised_by=datetime.now(UTC) + timedelta(days=2),
        ),
        Delivered(order_id=order_id),
    ):
        await stack.channel.publish(event)
    await until(lambda: status_in("delivered"), "the delivery")
    say("shipped from the warehouse and delivered")
    before = (await stack.level(sku, store))["on_hand"]
    handed_in = ReturnReceived(
        return_id=uid("demo-ret"),
        order_id=order_id,
        location_id=store,
        channel="store",
        lines=[{"sku": sku, "qty": 1, "resellable": True}],
        occurred_at=datetime.now(UTC),
    )
    await stack.channel.publish(handed_in)
    await stack.channel.publish(handed_in)  # the till sends it twice: still one refund
    say(f"{shopper.name} hands it in at the airport store (the till sends the return twice)")

    async def restocked() -> Any:
        level = await stack.level(sku, store)
        return level if level["on_hand"] == before + 1 else None

    await until(restocked, f"the restock at {store}")
    say(f"{store} has {before + 1} on hand now ({before} before)")
    order = await until(lambda: status_in("partially_returned", "returned", "refunded"), "refund")
    await asyncio.sleep(1)  # a second refund would have arrived by now
    order = await stack.order(order_id)
    if len(order["returns"]) != 1 or order["refunded"]["amount"] not in ("19.90", "19.9"):
        raise StoryFailed(f"expected one refund of 19.90, saw {order['refunded']}")
    say(f"one refund of {order['refunded']['amount']} EUR")


async def story_lost_demand(stack: Stack, say: Say) -> None:
    """7: checkouts that could not be served, biggest loss first, with revenue."""
    await stack.needs("inventory", "order")
    shopper = SHOPPERS[0]
    for sku, qty, unit in (("HEADPHONES-NC", 500, "199.00"), ("MUG-LOGO", 50, "12.00")):
        order_id = await stack.checkout(shopper, sku, qty, unit)

        async def rejected(order_id: str = order_id) -> bool:
            return (await stack.order(order_id))["status"] == "rejected"

        await until(rejected, f"the rejection of {qty} x {sku}")
        say(f"a web order for {qty} x {sku} cannot be served: rejected")
    report = await stack.get("inventory", "/lost-demand", limit=5)
    if not report:
        raise StoryFailed("no lost demand recorded")
    revenues = [Decimal(entry["revenue"]["amount"]) for entry in report]
    if revenues != sorted(revenues, reverse=True):
        raise StoryFailed("lost demand is not biggest first")
    for entry in report[:3]:
        where = entry["location_id"] or "delivery"
        say(
            f"  {entry['sku']:<16} {where:<10} {entry['units']:>5} units "
            f"{entry['revenue']['amount']:>10} {entry['revenue']['currency']}"
        )


async def story_abandoned_cart(stack: Stack, say: Say) -> None:
    """4: a cart left on the web site brings a message; one bought in a store does not."""
    await stack.needs(
        ("customer-profile", "/customers/{customer_id}"),
        ("notification", "/customers/{customer_id}/notifications"),
    )
    shopper = SHOPPERS[0]
    await _make_reachable(stack, shopper)
    cart = CartItemAdded(
        cart_id=uid("demo-cart"),
        channel="web",
        customer_id=shopper.customer_id,
        items=[Line(sku="TSHIRT-BLUE-M", qty=2, unit_price=price("19.90"))],
        occurred_at=datetime.now(UTC),
    )
    before = await _notification_count(stack, shopper)
    await stack.channel.publish(cart)
    say(f"{shopper.name} puts two t-shirts in a web cart and leaves")

    async def told() -> bool:
        return await _notification_count(stack, shopper) > before

    try:
        await until(told, "the reminder", timeout=60, every=0.5)
    except StoryFailed:
        raise StorySkipped(
            "no reminder within 60 s: this stack's cart timers are long (start it with "
            "CART_ABANDONMENT_DELAY=5, as `omni dev up` does)"
        ) from None
    notice = await _settled_notice(stack, shopper)
    say(f"the reminder: {notice}")
    if not notice.endswith(": sent"):
        raise StoryFailed(f"the reminder was not sent: {notice}")

    # The same cart, bought at a till instead: no reminder for it.
    second = CartItemAdded(
        cart_id=uid("demo-cart"),
        channel="web",
        customer_id=shopper.customer_id,
        items=[Line(sku="MUG-LOGO", qty=1, unit_price=price("12.00"))],
        occurred_at=datetime.now(UTC),
    )
    await stack.channel.publish(second)
    await stack.channel.publish(
        SaleRecorded(
            sale_id=uid("demo-sale"),
            location_id="store-001",
            lines=[Line(sku="MUG-LOGO", qty=1, unit_price=price("12.00"))],
            occurred_at=datetime.now(UTC),
            customer_id=shopper.customer_id,
        )
    )
    say(f"{shopper.name} fills another web cart, then buys the mug at the downtown till")
    reminded = await _notification_count(stack, shopper)
    await asyncio.sleep(float(stack.env.get("CART_ABANDONMENT_DELAY", "5")) + 5)
    if await _notification_count(stack, shopper) > reminded:
        raise StoryFailed("a reminder was sent for a cart bought in a store")
    say("no reminder for the cart bought in the store")


async def _make_reachable(stack: Stack, shopper: Shopper) -> None:
    """Sign the shopper in, give an e-mail and consent, as the web site would, and wait
    until the profile knows (notification learns contacts from the profile's snapshots)."""
    customer = shopper.customer_id
    await stack.channel.publish(
        CustomerIdentified(customer_id=customer, anonymous_id=f"{customer}-browser", channel="web")
    )
    await stack.channel.publish(ContactDetailsUpdated(customer_id=customer, email=shopper.email))
    await stack.channel.publish(
        PreferencesUpdated(
            customer_id=customer,
            preferences=Preferences(
                preferred_channel="email",
                consents=Consents(email=True),
                time_zone="UTC",
            ),
        )
    )

    async def known() -> bool:
        response = await stack.http.get(f"{stack.url('customer-profile')}/customers/{customer}")
        if response.status_code != 200:
            return False
        profile = response.json()
        consents = (profile.get("preferences") or {}).get("consents") or {}
        email = (profile.get("contact") or {}).get("email")
        return bool(email) and consents.get("email") is True

    await until(known, "the shopper's profile", timeout=30, every=0.3)
    await asyncio.sleep(1)  # the snapshot reaches notification a moment later


async def _notification_count(stack: Stack, shopper: Shopper) -> int:
    response = await stack.http.get(
        f"{stack.url('notification')}/customers/{shopper.customer_id}/notifications"
    )
    if response.status_code == 404:
        return 0  # nobody told yet
    data = response.json()
    items = data.get("items", data.get("notifications", [])) if isinstance(data, dict) else data
    return len(items)


async def _settled_notice(stack: Stack, shopper: Shopper) -> str:
    """The newest notice's outcome once it is no longer being sent."""

    async def settled() -> str | None:
        notice = await _newest_notice(stack, shopper)
        # Deferred for the shopper's contact budget: it goes once there is room again.
        return None if notice.endswith((": pending", ": sending", "(budget)")) else notice

    try:
        return await until(settled, "the notice's outcome", timeout=60, every=0.3)
    except StoryFailed:
        return await _newest_notice(stack, shopper)


async def _newest_notice(stack: Stack, shopper: Shopper) -> str:
    """The newest notice's outcome as the notification service tells it."""
    response = await stack.http.get(
        f"{stack.url('notification')}/customers/{shopper.customer_id}/notifications"
    )
    items = response.json() if response.status_code == 200 else []
    if isinstance(items, dict):
        items = items.get("items", items.get("notifications", []))
    if not items:
        return "nothing"
    item = items[0]
    reason = f" ({item['reason']})" if item.get("reason") else ""
    return f"{item.get('channel') or 'no channel'}: {item.get('status')}{reason}"


async def story_points(stack: Stack, say: Say) -> None:
    """5: points earned at a till with a loyalty card, then spent in the app."""
    await stack.needs("inventory", "order", ("loyalty", "/accounts/{customer_id}"))
    shopper = SHOPPERS[1]
    before = await _balance(stack, shopper)
    await stack.channel.publish(
        SaleRecorded(
            sale_id=uid("demo-sale"),
            location_id="store-001",
            lines=[Line(sku="TSHIRT-BLUE-M", qty=2, unit_price=price("19.90"))],
            occurred_at=datetime.now(UTC),
            customer_id=shopper.customer_id,
            loyalty_card=shopper.loyalty_card,
        )
    )
    say(f"{shopper.name} shows a loyalty card at the downtown till")

    async def earned() -> int:
        balance = await _balance(stack, shopper)
        return balance if balance > before else 0

    after = await until(earned, "the points", timeout=30)
    say(f"points: {before} -> {after}")
    body = {
        "checkout_id": uid("demo-chk"),
        "customer_id": shopper.customer_id,
        "channel": "app",
        "lines": [
            {"sku": "TSHIRT-BLUE-M", "qty": 1, "unit_price": {"amount": "19.90", "currency": "EUR"}}
        ],
        "fulfillment": {"type": "pickup", "location_id": "store-001"},
        "payment": {
            "reference": uid("demo-pay"),
            "authorized": {"amount": "19.90", "currency": "EUR"},
        },
        "points_to_redeem": after,
    }
    await stack.post("order", "/orders", body)
    say(f"{shopper.name} spends {after} points on a pickup order in the app")

    async def spent() -> bool:
        return await _balance(stack, shopper) < after

    await until(spent, "the redemption", timeout=30)
    say(f"points now: {await _balance(stack, shopper)}")


async def _balance(stack: Stack, shopper: Shopper) -> int:
    response = await stack.http.get(f"{stack.url('loyalty')}/accounts/{shopper.customer_id}")
    if response.status_code == 404:
        return 0
    data = response.json()
    return int(data.get("available", data.get("balance", 0)))


async def story_eta_slips(stack: Stack, say: Say) -> None:
    """6: the carrier's new ETA is after the promise: the order is delayed, the shopper told."""
    await stack.needs(
        "inventory",
        "order",
        ("customer-profile", "/customers/{customer_id}"),
        ("notification", "/customers/{customer_id}/notifications"),
    )
    shopper = SHOPPERS[0]
    await _make_reachable(stack, shopper)
    order_id = await stack.checkout(shopper, "TSHIRT-BLUE-M", 1, "19.90")

    async def confirmed() -> bool:
        return (await stack.order(order_id))["status"] == "confirmed"

    await until(confirmed, "the confirmation")
    promise = datetime.now(UTC) + timedelta(days=1)
    await stack.channel.publish(
        Shipped(order_id=order_id, carrier="demo-post", tracking_id=uid("trk"), promised_by=promise)
    )
    before = await _notification_count(stack, shopper)
    await stack.channel.publish(
        EtaChanged(order_id=order_id, eta=promise + timedelta(days=2), carrier="demo-post")
    )
    say("the carrier now expects to deliver two days after the promise")

    async def told() -> bool:
        return await _notification_count(stack, shopper) > before

    await until(told, "the delay notice", timeout=30, every=0.5)
    notice = await _settled_notice(stack, shopper)
    say(f"{shopper.name} is told before asking: {notice}")
    if not notice.endswith(": sent"):
        raise StoryFailed(f"the delay notice was not sent: {notice}")


PLAYERS: dict[int, Callable[[Stack, Say], Awaitable[None]]] = {
    1: story_last_unit,
    2: story_pickup_not_collected,
    3: story_returned_elsewhere,
    4: story_abandoned_cart,
    5: story_points,
    6: story_eta_slips,
    7: story_lost_demand,
}


async def play_story(number: int, say: Say, env: Mapping[str, str]) -> str:
    """Play story ``number``; returns ``passed`` or ``skipped``, raises :class:`StoryFailed`."""
    if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
        raise StoryFailed("no running stack (dev.env has no KAFKA_BOOTSTRAP_SERVERS)")
    async with ChannelPublisher(
        env["KAFKA_BOOTSTRAP_SERVERS"], env.get("TOPIC_PREFIX", ""), source="/channels/demo"
    ) as channel:
        stack = Stack(env, channel)
        try:
            await PLAYERS[number](stack, say)
        except StorySkipped as exc:
            say(f"skipped: {exc}")
            return "skipped"
        finally:
            await stack.aclose()
    return "passed"


async def play_all(env: Mapping[str, str], numbers: tuple[int, ...], say: Say) -> dict[int, str]:
    """Play ``numbers`` in order, narrating; stops at the first that fails (re-raised)."""
    outcomes: dict[int, str] = {}
    for number in numbers:
        say(f"story {number}: {STORIES[number]}")
        started = time.monotonic()
        try:
            outcome = await play_story(number, lambda line: say(f"  {line}"), env)
        except StoryFailed as exc:
            say(f"  FAILED: {exc}")
            raise
        outcomes[number] = outcome
        mark = "ok" if outcome == "passed" else "skipped"
        say(f"  {mark} ({time.monotonic() - started:.1f} s)")
    return outcomes
