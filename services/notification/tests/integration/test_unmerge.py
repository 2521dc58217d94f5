"""Undoing a merge: the restored shopper gets back their contact, alerts, offers, purchases
and notification history, against the real broker and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from omni_contracts import (
    AvailabilityCause,
    AvailabilityChanged,
    AvailabilityStatus,
    Channel,
    OfferIssued,
    OrderConfirmed,
    OrderPlaced,
    ProfilesMerged,
    ProfilesUnmerged,
    StockAlertRequested,
)


async def _rows(svc: Any, customer_id: str) -> dict[str, list[str]]:
    """What notification holds under ``customer_id``: alerts (SKU), offers, purchases (SKU),
    notifications (kind) and its contact's e-mail."""
    async with svc.runtime.pool.acquire() as conn:
        alerts = await conn.fetch(
            "SELECT sku FROM stock_alerts WHERE customer_id = $1 ORDER BY sku", customer_id
        )
        offers = await conn.fetch(
            "SELECT offer_key FROM offers WHERE customer_id = $1 ORDER BY 1", customer_id
        )
        purchases = await conn.fetch(
            "SELECT sku FROM purchases WHERE customer_id = $1 ORDER BY sku", customer_id
        )
        sent = await conn.fetch(
            "SELECT kind FROM notifications WHERE customer_id = $1 ORDER BY kind", customer_id
        )
        contact = await conn.fetch("SELECT email FROM contacts WHERE customer_id = $1", customer_id)
    return {
        "alerts": [r["sku"] for r in alerts],
        "offers": [r["offer_key"] for r in offers],
        "purchases": [r["sku"] for r in purchases],
        "notifications": [r["kind"] for r in sent],
        "contact": [r["email"] for r in contact],
    }


def _placed(customer_id: str, sku: str, ev: Any) -> OrderPlaced:
    return OrderPlaced(
        order_id=ev.uid("order"),
        customer_id=customer_id,
        channel=Channel.STORE,
        status="completed",
        lines=[ev.line(sku)],
        fulfillment={"type": "pickup", "location_id": "store-1"},
    )


def _offer(customer_id: str, ev: Any) -> OfferIssued:
    return OfferIssued(
        customer_id=customer_id,
        points=0,
        balance=0,
        reason="bought_together",
        offer_id=ev.uid("offer"),
        sku=ev.uid("SKU"),
        reward="10%",
        valid_until=datetime.now(UTC) + timedelta(days=7),
    )


async def test_an_unmerge_gives_the_restored_shopper_back_contact_and_history(
    start_notification, channel, smtp_server, ev
) -> None:
    survivor, restored = ev.uid("cust"), ev.uid("cust")
    mine, theirs = f"{ev.uid('s')}@example.com", f"{ev.uid('r')}@example.com"
    wanted, bought, own_bought = ev.uid("SKU"), ev.uid("SKU"), ev.uid("SKU")
    async with start_notification() as svc:
        await ev.given_profile(channel, svc, survivor, email=mine)
        await ev.given_profile(channel, svc, restored, email=theirs)
        # Each has history of their own before the merge.
        await channel.publish(StockAlertRequested(customer_id=restored, sku=wanted))
        await channel.publish(_placed(restored, bought, ev))
        await channel.publish(_placed(survivor, own_bought, ev))
        await channel.publish(_offer(restored, ev))
        for customer_id in (survivor, restored):
            await channel.publish(
                OrderConfirmed(
                    order_id=ev.uid("order"), customer_id=customer_id, channel=Channel.WEB
                )
            )
        await smtp_server.wait_for(theirs)
        await smtp_server.wait_for(mine)
        await ev.settled(svc, restored)

        async def has(customer_id: str, **want: int) -> bool:
            rows = await _rows(svc, customer_id)
            return all(len(rows[k]) == n for k, n in want.items())

        await ev.wait_until(lambda: has(restored, alerts=1, offers=1, purchases=1, notifications=2))
        before = await _rows(svc, restored)
        mine_before = await _rows(svc, survivor)

        await channel.publish(ProfilesMerged(surviving_id=survivor, merged_ids=[restored]))
        await ev.wait_until(
            lambda: has(restored, alerts=0, offers=0, purchases=0, notifications=0, contact=0)
        )
        # The offer was told too (suppressed: no marketing consent): two rows of history.
        assert await has(survivor, alerts=1, offers=1, purchases=2, notifications=3)

        # As customer-profile does: the unmerge, then fresh snapshots of both.
        await channel.publish(ProfilesUnmerged(surviving_id=survivor, restored_id=restored))
        await channel.publish(ev.profile(restored, version=2, email=theirs))
        await channel.publish(ev.profile(survivor, version=2, email=mine))
        await ev.wait_until(lambda: has(restored, notifications=2, contact=1))
        assert await _rows(svc, restored) == before
        assert await _rows(svc, survivor) == mine_before
        history = await ev.notifications(svc, restored)
        assert sorted(n["kind"] for n in history) == ["loyalty_offer_issued", "order_confirmed"]

        # The restored shopper's alert is theirs again: back in stock, they are told.
        await channel.publish(
            AvailabilityChanged(
                sku=wanted,
                location_id="wh-1",
                on_hand=3,
                reserved=0,
                available=3,
                status=AvailabilityStatus.IN_STOCK,
                previous_status=AvailabilityStatus.OUT_OF_STOCK,
                online_available=3,
                cause=AvailabilityCause.ADJUSTMENT,
                changed_at=datetime.now(UTC),
            )
        )
        rows = await ev.settled(svc, restored, 3)
        assert sorted(r["kind"] for r in rows) == [
            "back_in_stock",
            "loyalty_offer_issued",
            "order_confirmed",
        ]
        assert [r["kind"] for r in await ev.notifications(svc, survivor)] == ["order_confirmed"]


async def test_a_redelivered_or_resent_unmerge_moves_nothing_twice(
    start_notification, channel, ev
) -> None:
    survivor, restored = ev.uid("cust"), ev.uid("cust")
    async with start_notification() as svc:
        await channel.publish(StockAlertRequested(customer_id=restored, sku=ev.uid("SKU")))
        await channel.publish(_offer(restored, ev))
        await ev.wait_until(lambda: _count(svc, restored, "offers"))
        await ev.wait_until(lambda: _count(svc, restored, "stock_alerts"))
        await channel.publish(ProfilesMerged(surviving_id=survivor, merged_ids=[restored]))
        await ev.wait_until(lambda: _count(svc, survivor, "offers"))
        unmerged = ProfilesUnmerged(surviving_id=survivor, restored_id=restored)
        envelope = await channel.publish(unmerged)
        await ev.wait_until(lambda: _count(svc, restored, "offers"))
        # After it was undone, the survivor gets an alert and an offer of its own.
        await channel.publish(StockAlertRequested(customer_id=survivor, sku=ev.uid("SKU")))
        await channel.publish(_offer(survivor, ev))
        await ev.wait_until(lambda: _count(svc, survivor, "offers"))
        await ev.wait_until(lambda: _count(svc, survivor, "stock_alerts"))

        await channel.publish(unmerged, envelope=envelope)  # redelivered: same ce_id
        await channel.publish(unmerged)  # resent: a new ce_id
        # Same topic and key, so handled after both: the marker says they were.
        await channel.publish(ev.profile(survivor, version=7, email="marker@example.com"))

        async def marked() -> bool:
            async with svc.runtime.pool.acquire() as conn:
                return (
                    await conn.fetchval(
                        "SELECT version FROM contacts WHERE customer_id = $1", survivor
                    )
                ) == 7

        await ev.wait_until(marked)
        for table in ("offers", "stock_alerts"):
            assert await _count(svc, survivor, table) == 1, table
            assert await _count(svc, restored, table) == 1, table


async def _count(svc: Any, customer_id: str, table: str) -> int:
    async with svc.runtime.pool.acquire() as conn:
        return await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE customer_id = $1",
            customer_id,
        )
