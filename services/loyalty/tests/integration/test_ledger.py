"""The loyalty service alone against the real broker and PostgreSQL.

Order lifecycle and profile events are published as the order and customer-profile services
publish them; outcomes are read from ``loyalty.ledger.v1``, the read API and the tables.
Timers far in the future (tier reviews) are brought forward in the ``timers`` table.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from loyalty_service.entrypoints.app import create_app
from loyalty_service.settings import LoyaltySettings
from omni_contracts import (
    Channel,
    OrderConfirmed,
    OrderPlaced,
    OrderReturnReceived,
    ProfileErased,
    ProfilesMerged,
    ProfileUpdated,
)
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.plugin import TopicReader, isolated_env
from omni_devkit.testing.services import RunningService, running

pytestmark = pytest.mark.integration

STORE = "store-1"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def money(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "EUR"}


async def eventually(
    read: Callable[[], Awaitable[Any]], until: Callable[[Any], bool], wait_s: float = 15
) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        value = await read()
        if until(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(0.05)


@dataclass
class Loyalty:
    service: RunningService
    channel: ChannelPublisher
    ledger: TopicReader

    @property
    def pool(self) -> asyncpg.Pool:
        return self.service.runtime.pool

    async def sale(
        self, customer_id: str | None, *lines: tuple[str, int, str], card: str | None = None
    ) -> str:
        """An in-store sale as order publishes it (an order born completed)."""
        order_id = uid("ord")
        await self.channel.publish(
            OrderPlaced(
                order_id=order_id,
                customer_id=customer_id,
                channel=Channel.STORE,
                status="completed",
                lines=[{"sku": s, "qty": q, "unit_price": money(p)} for s, q, p in lines],
                fulfillment={"type": "pickup", "location_id": STORE},
                sale_id=uid("sale"),
                loyalty_card=card,
            )
        )
        return order_id

    async def account(self, customer_id: str) -> dict[str, Any]:
        response = await self.service.http.get(f"/accounts/{customer_id}")
        return response.json() if response.status_code == 200 else {}

    async def account_until(
        self, customer_id: str, until: Callable[[dict[str, Any]], bool], wait_s: float = 15
    ) -> dict[str, Any]:
        return await eventually(
            lambda: self.account(customer_id), lambda a: bool(a) and until(a), wait_s
        )

    async def entry(self, customer_id: str, ce_type: str, wait_s: float = 15) -> dict[str, Any]:
        record = await self.ledger.next(
            lambda r: r.key == customer_id.encode() and record_headers(r)["ce_type"] == ce_type,
            timeout=wait_s,
        )
        return json.loads(record.value)

    async def none(self, customer_id: str, ce_type: str, wait_s: float = 1.0) -> bool:
        found = await self.ledger.collect(
            1,
            wait_s,
            lambda r: r.key == customer_id.encode() and record_headers(r)["ce_type"] == ce_type,
        )
        return not found


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def loyalty(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[Loyalty]:
    """Loyalty with no return window, a 2 s hold, expiry after 4 s idle (notice 2 s before),
    and a low silver tier."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env:
        settings = LoyaltySettings.from_settings(
            env.settings("loyalty"),
            loyalty_pending_days=0,
            loyalty_hold_minutes=2 / 60,
            loyalty_expiry_months=4 / 86400 / 30.44,
            loyalty_expiry_notice_days=2 / 86400,
            loyalty_tiers="base=0:1,silver=50:2",
            loyalty_timer_poll_s=0.1,
        )
        async with (
            running(create_app(settings)) as service,
            ChannelPublisher(env.bootstrap, env.prefix) as channel,
            env.reader("loyalty.ledger.v1") as ledger,
        ):
            yield Loyalty(service, channel, ledger)


async def test_the_balance_is_the_sum_of_the_ledger_and_the_ledger_is_append_only(
    loyalty: Loyalty,
) -> None:
    customer = uid("cust")
    for price in ("3.00", "4.50", "1.25"):
        await loyalty.sale(customer, (uid("SKU"), 1, price))
    account = await loyalty.account_until(customer, lambda a: a["available"] == 8)
    assert account["available"] == 8  # 3 + 4 + 1, each rounded down
    registry = loyalty.service.runtime.metrics.registry
    labels = {"service": "loyalty", "kind": "pending"}
    assert (registry.get_sample_value("omni_loyalty_ledger_entries_total", labels) or 0) >= 3
    metrics = (await loyalty.service.metrics.get("/metrics")).text
    assert "omni_loyalty_points_total" in metrics
    async with loyalty.pool.acquire() as conn:
        sums = await conn.fetchrow(
            "SELECT sum(l.available_delta) AS available, sum(l.pending_delta) AS pending,"
            " sum(l.held_delta) AS held, min(a.available) AS balance FROM ledger l"
            " JOIN accounts a USING (account_id) WHERE a.customer_id = $1",
            customer,
        )
        assert (sums["available"], sums["pending"], sums["held"]) == (8, 0, 0)
        assert sums["balance"] == 8
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE ledger SET points = points + 1")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("DELETE FROM ledger")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "UPDATE accounts SET available = available - 9 WHERE customer_id = $1", customer
            )


async def test_a_resent_order_with_a_new_event_id_earns_once(loyalty: Loyalty) -> None:
    customer, order_id = uid("cust"), uid("ord")
    placed = OrderPlaced(
        order_id=order_id,
        customer_id=customer,
        channel=Channel.STORE,
        status="completed",
        lines=[{"sku": uid("SKU"), "qty": 1, "unit_price": money("10.00")}],
        fulfillment={"type": "pickup", "location_id": STORE},
    )
    await loyalty.channel.publish(placed)
    await loyalty.channel.publish(placed)  # a new ce_id: the inbox cannot tell, the cause can
    await loyalty.account_until(customer, lambda a: a["available"] == 10)
    await asyncio.sleep(0.5)
    assert (await loyalty.account(customer))["lifetime"] == 10


async def test_concurrent_checkouts_hold_no_more_points_than_there_are(loyalty: Loyalty) -> None:
    customer = uid("cust")
    await loyalty.sale(customer, (uid("SKU"), 1, "500.00"))
    await loyalty.account_until(customer, lambda a: a["available"] == 500)
    orders = [uid("ord") for _ in range(12)]
    await asyncio.gather(
        *(
            loyalty.channel.publish(
                OrderPlaced(
                    order_id=order_id,
                    customer_id=customer,
                    channel=Channel.WEB,
                    lines=[{"sku": "X", "qty": 1, "unit_price": money("5.00")}],
                    fulfillment={"type": "pickup", "location_id": STORE},
                    points_to_redeem=100,
                    awaiting=["inventory", "loyalty"],
                )
            )
            for order_id in orders
        )
    )
    outcomes = await loyalty.ledger.collect(
        12,
        20,
        lambda r: (
            r.key == customer.encode()
            and record_headers(r)["ce_type"] in ("loyalty.points.held", "loyalty.points.refused")
        ),
    )
    kinds = [record_headers(r)["ce_type"] for r in outcomes]
    assert len(kinds) == 12
    # Five holds at least (more only if a 2 s hold lapsed and gave its points back meanwhile).
    assert kinds.count("loyalty.points.held") >= 5 and kinds.count("loyalty.points.refused") >= 1
    async with loyalty.pool.acquire() as conn:
        most_held = await conn.fetchval(
            "SELECT max(held) FROM (SELECT sum(l.held_delta) OVER (ORDER BY l.entry_id) AS held"
            " FROM ledger l JOIN accounts a USING (account_id) WHERE a.customer_id = $1) s",
            customer,
        )
    assert most_held == 500  # never more held at once than there were points
    account = await loyalty.account(customer)
    assert account["available"] + account["held"] == 500
    # A held order sent again (a new event id) is not refused now that the points are gone.
    winner = next(
        json.loads(r.value)["order_id"]
        for r in outcomes
        if record_headers(r)["ce_type"] == "loyalty.points.held"
    )
    await loyalty.channel.publish(
        OrderPlaced(
            order_id=winner,
            customer_id=customer,
            channel=Channel.WEB,
            lines=[{"sku": "X", "qty": 1, "unit_price": money("5.00")}],
            fulfillment={"type": "pickup", "location_id": STORE},
            points_to_redeem=100,
            awaiting=["inventory", "loyalty"],
        )
    )
    # An order that does not await loyalty holds nothing (loyalty is not in its saga).
    await loyalty.channel.publish(
        OrderPlaced(
            order_id=uid("ord"),
            customer_id=customer,
            channel=Channel.WEB,
            lines=[{"sku": "X", "qty": 1, "unit_price": money("5.00")}],
            fulfillment={"type": "pickup", "location_id": STORE},
            points_to_redeem=100,
            awaiting=["inventory"],
        )
    )
    assert await loyalty.none(customer, "loyalty.points.refused")


async def test_a_hold_never_settled_is_released_by_its_timer(loyalty: Loyalty) -> None:
    customer, order_id = uid("cust"), uid("ord")
    await loyalty.sale(customer, (uid("SKU"), 1, "300.00"))
    await loyalty.account_until(customer, lambda a: a["available"] == 300)
    await loyalty.channel.publish(
        OrderPlaced(
            order_id=order_id,
            customer_id=customer,
            channel=Channel.APP,
            lines=[{"sku": "X", "qty": 1, "unit_price": money("5.00")}],
            fulfillment={"type": "pickup", "location_id": STORE},
            points_to_redeem=200,
            awaiting=["inventory", "loyalty"],
        )
    )
    held = await loyalty.entry(customer, "loyalty.points.held")
    assert held["balance"] == 100 and held["value"] == money("2.00")
    released = await loyalty.entry(customer, "loyalty.points.released", wait_s=10)
    assert released["reason"] == "order_hold_expired" and released["balance"] == 300
    # Confirmed late anyway: the points are still there, so they are spent now.
    await loyalty.channel.publish(
        OrderConfirmed(order_id=order_id, customer_id=customer, channel=Channel.APP)
    )
    redeemed = await loyalty.entry(customer, "loyalty.points.redeemed")
    assert redeemed["points"] == -200 and redeemed["balance"] == 100


async def test_idle_points_are_announced_then_expire(loyalty: Loyalty) -> None:
    customer = uid("cust")
    await loyalty.sale(customer, (uid("SKU"), 1, "20.00"))
    account = await loyalty.account_until(customer, lambda a: a["available"] == 20)
    assert account["next_expiry"] is not None
    notice = await loyalty.entry(customer, "loyalty.points.expiring", wait_s=10)
    assert notice["expiring_points"] == 20 and notice["points"] == 0 and notice["expires_at"]
    expired = await loyalty.entry(customer, "loyalty.points.expired", wait_s=10)
    assert expired["points"] == -20 and expired["balance"] == 0
    account = await loyalty.account(customer)
    assert (account["available"], account["lifetime"]) == (0, 20)


async def test_a_tier_goes_up_at_once_and_down_only_at_its_review(loyalty: Loyalty) -> None:
    customer, sku = uid("cust"), uid("SKU")
    order_id = await loyalty.sale(customer, (sku, 2, "30.00"))
    changed = await loyalty.entry(customer, "loyalty.tier.changed")
    assert (changed["previous_tier"], changed["tier"]) == ("base", "silver")
    account = await loyalty.account(customer)
    assert account["tier"] == "silver" and account["tier_review_at"] is not None
    # A return takes the 12 months' spend below silver: no downgrade yet.
    await loyalty.channel.publish(
        OrderReturnReceived(
            order_id=order_id,
            customer_id=customer,
            channel=Channel.STORE,
            status="partially_returned",
            return_id=uid("ret"),
            location_id=STORE,
            lines=[{"sku": sku, "qty": 1, "resellable": True}],
        )
    )
    await loyalty.entry(customer, "loyalty.points.reversed")
    assert (await loyalty.account(customer))["tier"] == "silver"
    # The review date comes (brought forward): 30.00 over 12 months is base again.
    async with loyalty.pool.acquire() as conn:
        moved = await conn.execute(
            "UPDATE timers SET due_at = now() WHERE kind = 'loyalty.tier_review' AND key = ("
            " SELECT account_id::text FROM accounts WHERE customer_id = $1)",
            customer,
        )
        assert moved == "UPDATE 1"
    changed = await loyalty.entry(customer, "loyalty.tier.changed")
    assert (changed["previous_tier"], changed["tier"], changed["reason"]) == (
        "silver",
        "base",
        "tier_review",
    )


async def test_an_erased_shopper_is_pseudonymised_and_the_ledger_keeps_its_figures(
    loyalty: Loyalty,
) -> None:
    customer, card = uid("cust"), uid("CARD")
    await loyalty.channel.publish(
        ProfileUpdated(customer_id=customer, loyalty_card=card, preferred_store=STORE)
    )
    await loyalty.sale(None, (uid("SKU"), 1, "12.00"), card=card)  # the card earns for them
    await loyalty.account_until(customer, lambda a: a["available"] == 12)
    await loyalty.channel.publish(ProfileErased(customer_id=customer))

    async def gone() -> int:
        return (await loyalty.service.http.get(f"/accounts/{customer}")).status_code

    assert await eventually(gone, lambda status: status == 404) == 404
    async with loyalty.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT a.customer_id, a.preferred_store, count(l.*) AS entries,"
            " (SELECT count(*) FROM cards c WHERE c.account_id = a.account_id) AS cards"
            " FROM accounts a JOIN ledger l USING (account_id)"
            " WHERE a.erased_at IS NOT NULL AND a.customer_id = 'erased:' || a.account_id"
            " GROUP BY a.account_id"
        )
    assert row is not None and row["preferred_store"] is None and row["cards"] == 0
    assert row["entries"] >= 1  # figures kept, no name


async def test_an_erased_id_stays_erased_whatever_comes_later(loyalty: Loyalty) -> None:
    """Earn and redeem events that name an erased shopper are acknowledged: no account is
    opened under the id again, nothing is earned or published for it, a hold is refused."""
    customer, never_seen = uid("cust"), uid("cust")
    await loyalty.sale(customer, (uid("SKU"), 1, "9.00"))
    await loyalty.account_until(customer, lambda a: a["available"] == 9)
    await loyalty.channel.publish(ProfileErased(customer_id=customer))
    await loyalty.channel.publish(ProfileErased(customer_id=never_seen))

    async def gone() -> int:
        return (await loyalty.service.http.get(f"/accounts/{customer}")).status_code

    assert await eventually(gone, lambda status: status == 404) == 404
    for who in (customer, never_seen):
        await loyalty.sale(who, (uid("SKU"), 1, "30.00"))
        await loyalty.channel.publish(ProfileUpdated(customer_id=who, preferred_store=STORE))
        await loyalty.channel.publish(
            OrderPlaced(
                order_id=uid("ord"),
                customer_id=who,
                channel=Channel.WEB,
                lines=[{"sku": "X", "qty": 1, "unit_price": money("5.00")}],
                fulfillment={"type": "pickup", "location_id": STORE},
                points_to_redeem=5,
                awaiting=["inventory", "loyalty"],
            )
        )
        # The hold is answered (the saga must not wait), and refused: nothing to spend.
        assert await loyalty.entry(who, "loyalty.points.refused")
    # Nothing earned is published for an id never seen before its erasure (the other's
    # figures are read from its account below).
    assert await loyalty.none(never_seen, "loyalty.points.pending", wait_s=1.0)
    async with loyalty.pool.acquire() as conn:
        named = await conn.fetchval(
            "SELECT count(*) FROM accounts WHERE customer_id = ANY($1::text[])",
            [customer, never_seen],
        )
        erased = await conn.fetch(
            "SELECT a.available, a.preferred_store FROM erased_customers e"
            " JOIN accounts a USING (account_id) WHERE e.customer_id = ANY($1::text[])",
            [customer, never_seen],
        )
    assert named == 0  # no account under either id again
    assert sorted(r["available"] for r in erased) == [0, 9]  # nothing more earned
    assert all(r["preferred_store"] is None for r in erased)
    assert (await loyalty.service.http.get(f"/accounts/{never_seen}")).status_code == 404


async def test_the_read_api_pages_the_ledger_and_needs_a_key(loyalty: Loyalty) -> None:
    customer = uid("cust")
    for _ in range(5):
        await loyalty.sale(customer, (uid("SKU"), 1, "2.00"))
    await loyalty.account_until(customer, lambda a: a["available"] == 10)
    await asyncio.sleep(0.3)
    first = (await loyalty.service.http.get(f"/accounts/{customer}/ledger?limit=4")).json()
    assert len(first["entries"]) == 4 and first["next_before"] is not None
    rest = (
        await loyalty.service.http.get(
            f"/accounts/{customer}/ledger", params={"limit": 4, "before": first["next_before"]}
        )
    ).json()
    ids = [e["entry_id"] for e in first["entries"] + rest["entries"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert {e["kind"] for e in first["entries"] + rest["entries"]} == {"pending", "available"}
    unknown = await loyalty.service.http.get(f"/accounts/{uid('nobody')}")
    assert unknown.status_code == 404
    no_key = await loyalty.service.http.get(f"/accounts/{customer}", headers={"Authorization": ""})
    assert no_key.status_code == 401
    bad = await loyalty.service.http.get(f"/accounts/{customer}/ledger?limit=0")
    assert bad.status_code == 422


async def test_merged_profiles_bring_their_points_to_the_surviving_account(
    loyalty: Loyalty,
) -> None:
    survivor, merged, card = uid("cust"), uid("cust"), uid("CARD")
    await loyalty.channel.publish(ProfileUpdated(customer_id=merged, loyalty_card=card))
    await loyalty.sale(survivor, (uid("SKU"), 1, "10.00"))
    await loyalty.sale(merged, (uid("SKU"), 1, "7.00"))
    await loyalty.account_until(merged, lambda a: a["available"] == 7)
    await loyalty.account_until(survivor, lambda a: a["available"] == 10)
    await loyalty.channel.publish(ProfilesMerged(surviving_id=survivor, merged_ids=[merged]))
    account = await loyalty.account_until(survivor, lambda a: a["available"] == 17)
    assert (account["available"], account["lifetime"]) == (17, 17)
    earned = await loyalty.entry(survivor, "loyalty.points.earned")
    assert earned["points"] == 7 and earned["reason"] == "profiles_merged"
    assert (await loyalty.service.http.get(f"/accounts/{merged}")).status_code == 404
    # The merged shopper's card now collects for the survivor.
    await loyalty.sale(None, (uid("SKU"), 1, "3.00"), card=card)
    account = await loyalty.account_until(survivor, lambda a: a["available"] == 20)
    assert account["available"] == 20


async def test_a_manual_adjustment_is_applied_once_and_never_below_zero(loyalty: Loyalty) -> None:
    customer = uid("cust")
    await loyalty.sale(customer, (uid("SKU"), 1, "30.00"))
    await loyalty.account_until(customer, lambda a: a["available"] == 30)
    url = f"/accounts/{customer}/adjustments"
    body = {"adjustment_id": uid("adj"), "points": 20, "reason": "goodwill"}
    first = await loyalty.service.http.post(url, json=body)
    assert first.status_code == 201, first.text
    assert first.json()["balance"] == 50 and first.json()["kind"] == "earned"
    assert (await loyalty.service.http.post(url, json=body)).status_code == 200  # once
    earned = await loyalty.entry(customer, "loyalty.points.earned")
    assert earned["points"] == 20 and earned["reason"] == "adjusted:goodwill"
    too_much = {"adjustment_id": uid("adj"), "points": -51, "reason": "fraud"}
    assert (await loyalty.service.http.post(url, json=too_much)).status_code == 422
    taken = {"adjustment_id": uid("adj"), "points": -50, "reason": "fraud"}
    assert (await loyalty.service.http.post(url, json=taken)).json()["balance"] == 0
    reversed_ = await loyalty.entry(customer, "loyalty.points.reversed")
    assert reversed_["points"] == -50 and reversed_["balance"] == 0
    zero = {"adjustment_id": uid("adj"), "points": 0, "reason": "x"}
    assert (await loyalty.service.http.post(url, json=zero)).status_code == 422
    nobody = await loyalty.service.http.post(f"/accounts/{uid('nobody')}/adjustments", json=taken)
    assert nobody.status_code == 404
