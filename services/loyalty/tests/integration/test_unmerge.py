"""Undoing a merge, against the real broker and PostgreSQL.

Two shoppers earn, hold and redeem before and after customer-profile merged them (under
their own ids and the merged one's card); ``customer.profiles.unmerged`` gives each back
exactly what was theirs, publishes the change for both, and a redelivery changes nothing.
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
    ProfilesMerged,
    ProfilesUnmerged,
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

    async def sale(self, customer_id: str | None, price: str, *, card: str | None = None) -> None:
        await self.channel.publish(
            OrderPlaced(
                order_id=uid("ord"),
                customer_id=customer_id,
                channel=Channel.STORE,
                status="completed",
                lines=[{"sku": uid("SKU"), "qty": 1, "unit_price": money(price)}],
                fulfillment={"type": "pickup", "location_id": STORE},
                sale_id=uid("sale"),
                loyalty_card=card,
            )
        )

    async def hold(self, customer_id: str, points: int) -> str:
        order_id = uid("ord")
        await self.channel.publish(
            OrderPlaced(
                order_id=order_id,
                customer_id=customer_id,
                channel=Channel.APP,
                lines=[{"sku": uid("SKU"), "qty": 1, "unit_price": money("50.00")}],
                fulfillment={"type": "pickup", "location_id": STORE},
                points_to_redeem=points,
                awaiting=["inventory", "loyalty"],
            )
        )
        return order_id

    async def confirm(self, customer_id: str, order_id: str) -> None:
        await self.channel.publish(
            OrderConfirmed(order_id=order_id, customer_id=customer_id, channel=Channel.APP)
        )

    async def account(self, customer_id: str) -> dict[str, Any]:
        response = await self.service.http.get(f"/accounts/{customer_id}")
        return response.json() if response.status_code == 200 else {}

    async def account_until(
        self, customer_id: str, until: Callable[[dict[str, Any]], bool], wait_s: float = 15
    ) -> dict[str, Any]:
        account = await eventually(
            lambda: self.account(customer_id), lambda a: bool(a) and until(a), wait_s
        )
        assert account and until(account), account
        return account

    async def entry(
        self, customer_id: str, ce_type: str, reason: str, wait_s: float = 15
    ) -> dict[str, Any]:
        def wanted(r: Any) -> bool:
            return (
                r.key == customer_id.encode()
                and record_headers(r)["ce_type"] == ce_type
                and json.loads(r.value)["reason"] == reason
            )

        return json.loads((await self.ledger.next(wanted, timeout=wait_s)).value)

    async def sums(self, customer_id: str) -> dict[str, int]:
        """The account's buckets as its ledger adds them up, and as the account keeps them."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT a.available, a.pending, a.held, a.lifetime,"
                " sum(l.available_delta) AS l_available, sum(l.pending_delta) AS l_pending,"
                " sum(l.held_delta) AS l_held, sum(l.lifetime_delta) AS l_lifetime"
                " FROM accounts a JOIN ledger l USING (account_id) WHERE a.customer_id = $1"
                " GROUP BY a.account_id",
                customer_id,
            )
        return {k: int(v) for k, v in dict(row).items()}

    async def unmerge_entries(self) -> int:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                "SELECT count(*) FROM ledger WHERE reason = 'profiles_unmerged'"
            )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def loyalty(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[Loyalty]:
    """Loyalty with no return window (earned points are spendable at once)."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env:
        settings = LoyaltySettings.from_settings(
            env.settings("loyalty"), loyalty_pending_days=0, loyalty_timer_poll_s=0.1
        )
        async with (
            running(create_app(settings)) as service,
            ChannelPublisher(env.bootstrap, env.prefix) as channel,
            env.reader("loyalty.ledger.v1") as ledger,
        ):
            yield Loyalty(service, channel, ledger)


async def merged_and_busy(loyalty: Loyalty) -> tuple[str, str, str, str]:
    """Two shoppers earn, merge, then earn, hold and redeem under each id (and the merged
    one's card). Returns the survivor, the merged id, its card and its order still held.

    As shoppers of their own: the survivor 10 + 20 - 4 = 26 available (lifetime 30); the
    merged one 7 + 5 + 3 - 6 - 2 = 7 available and 2 held (lifetime 15).
    """
    survivor, merged, card = uid("cust"), uid("cust"), uid("CARD")
    await loyalty.channel.publish(ProfileUpdated(customer_id=merged, loyalty_card=card))
    await loyalty.sale(survivor, "10.00")
    await loyalty.sale(merged, "7.00")
    await loyalty.account_until(merged, lambda a: a["available"] == 7)
    await loyalty.account_until(survivor, lambda a: a["available"] == 10)

    await loyalty.channel.publish(ProfilesMerged(surviving_id=survivor, merged_ids=[merged]))
    await loyalty.account_until(survivor, lambda a: a["available"] == 17)

    await loyalty.sale(survivor, "20.00")
    await loyalty.account_until(survivor, lambda a: a["available"] == 37)
    await loyalty.sale(merged, "5.00")  # the merged id still in a till's hands
    await loyalty.account_until(survivor, lambda a: a["available"] == 42)
    await loyalty.sale(None, "3.00", card=card)  # the merged shopper's card
    await loyalty.account_until(survivor, lambda a: a["available"] == 45)
    order = await loyalty.hold(survivor, 4)
    await loyalty.account_until(survivor, lambda a: a["held"] == 4)
    await loyalty.confirm(survivor, order)
    await loyalty.account_until(survivor, lambda a: a["held"] == 0 and a["available"] == 41)
    order = await loyalty.hold(merged, 6)
    await loyalty.account_until(survivor, lambda a: a["held"] == 6)
    await loyalty.confirm(merged, order)
    await loyalty.account_until(survivor, lambda a: a["held"] == 0 and a["available"] == 35)
    still_held = await loyalty.hold(merged, 2)
    account = await loyalty.account_until(survivor, lambda a: a["held"] == 2)
    assert (account["available"], account["lifetime"]) == (33, 45)
    return survivor, merged, card, still_held


async def test_an_unmerge_gives_each_shopper_back_what_was_theirs(loyalty: Loyalty) -> None:
    survivor, merged, card, still_held = await merged_and_busy(loyalty)
    assert (await loyalty.service.http.get(f"/accounts/{merged}")).status_code == 404

    await loyalty.channel.publish(ProfilesUnmerged(surviving_id=survivor, restored_id=merged))
    restored = await loyalty.account_until(merged, lambda a: a["held"] == 2)
    assert (restored["available"], restored["pending"], restored["lifetime"]) == (7, 0, 15)
    kept = await loyalty.account(survivor)
    assert (kept["available"], kept["pending"], kept["held"], kept["lifetime"]) == (26, 0, 0, 30)

    # Both are told: the survivor's spendable balance went down, the restored one's up.
    taken = await loyalty.entry(survivor, "loyalty.points.reversed", "profiles_unmerged")
    assert (taken["points"], taken["balance"]) == (-7, 26)
    given = await loyalty.entry(merged, "loyalty.points.earned", "profiles_unmerged")
    assert (given["points"], given["balance"]) == (7, 7)

    # Each ledger adds up to its account, every bucket.
    for customer_id in (survivor, merged):
        s = await loyalty.sums(customer_id)
        assert (s["available"], s["pending"], s["held"], s["lifetime"]) == (
            s["l_available"],
            s["l_pending"],
            s["l_held"],
            s["l_lifetime"],
        ), customer_id

    # Its hold, its card and its id are its own again.
    await loyalty.confirm(merged, still_held)
    await loyalty.account_until(merged, lambda a: a["held"] == 0 and a["available"] == 7)
    await loyalty.channel.publish(ProfileUpdated(customer_id=merged, loyalty_card=card))
    await loyalty.sale(None, "3.00", card=card)
    await loyalty.account_until(merged, lambda a: a["available"] == 10)
    await loyalty.sale(merged, "2.00")
    await loyalty.account_until(merged, lambda a: a["available"] == 12)
    assert (await loyalty.account(survivor))["available"] == 26


async def test_a_redelivered_or_resent_unmerge_moves_nothing_twice(loyalty: Loyalty) -> None:
    survivor, merged, _, _ = await merged_and_busy(loyalty)
    unmerged = ProfilesUnmerged(surviving_id=survivor, restored_id=merged)
    envelope = await loyalty.channel.publish(unmerged)
    await loyalty.account_until(merged, lambda a: a["available"] == 7 and a["held"] == 2)
    entries = await loyalty.unmerge_entries()

    await loyalty.channel.publish(unmerged, envelope=envelope)  # redelivered: same ce_id
    await loyalty.channel.publish(unmerged)  # resent: a new ce_id
    marker = uid("store")  # same key, same partition: handled after both
    await loyalty.channel.publish(ProfileUpdated(customer_id=survivor, preferred_store=marker))

    async def store() -> str | None:
        async with loyalty.pool.acquire() as conn:
            return await conn.fetchval(
                "SELECT preferred_store FROM accounts WHERE customer_id = $1", survivor
            )

    assert await eventually(store, lambda s: s == marker) == marker
    assert await loyalty.unmerge_entries() == entries
    restored, kept = await loyalty.account(merged), await loyalty.account(survivor)
    assert (restored["available"], restored["held"], restored["lifetime"]) == (7, 2, 15)
    assert (kept["available"], kept["held"], kept["lifetime"]) == (26, 0, 30)
