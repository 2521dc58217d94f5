"""One contact budget across every channel, and digests: through the real SMTP server and the
loopback Web Push service (which verifies VAPID and decrypts)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from omni_contracts import (
    AvailabilityCause,
    AvailabilityChanged,
    AvailabilityStatus,
    Channel,
    OfferIssued,
    OrderConfirmed,
    OrderReadyForPickup,
    StockAlertRequested,
)
from omni_devkit.testing.events import record_headers

# A window of seconds stands for the day of production.
WINDOW_S = 8.0


def _outcome(record: Any) -> dict[str, Any]:
    return {"type": record_headers(record)["ce_type"], **json.loads(record.value)}


def _offer(customer: str, ev: Any) -> OfferIssued:
    return OfferIssued(
        customer_id=customer,
        points=0,
        balance=120,
        reason="tier_gift",
        offer_id=ev.uid("offer"),
        description="10% off your next order",
        reward="10%",
        valid_until=datetime.now(UTC) + timedelta(days=7),
    )


def _back(sku: str) -> AvailabilityChanged:
    return AvailabilityChanged(
        sku=sku,
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


async def test_one_budget_across_channels_defers_marketing_and_never_order_updates(
    start_notification, channel, smtp_server, push_endpoint, omni_env, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    browser = push_endpoint.subscribe()
    outcomes = omni_env.reader("notification.dispatched.v1")

    def mine(kind: str, ce_type: str) -> Any:
        return lambda r: (
            _outcome(r)["type"] == ce_type
            and _outcome(r)["customer_id"] == customer
            and _outcome(r).get("template") == kind
        )

    async with start_notification(
        notify_budget_window_hours=WINDOW_S / 3600, notify_budget_marketing=2
    ) as svc:
        # Order updates by push (preferred), marketing by e-mail (the only yes).
        await ev.given_profile(
            channel,
            svc,
            customer,
            email=address,
            push_subscriptions=[browser],
            preferences={"preferred_channel": "push", "consents": {"email": True}},
        )
        order_id = ev.uid("order")
        await channel.publish(
            OrderConfirmed(order_id=order_id, customer_id=customer, channel=Channel.WEB)
        )
        await push_endpoint.wait_for(browser)  # contact 1 of 2, on push
        await channel.publish(_offer(customer, ev))
        await smtp_server.wait_for(address)  # contact 2 of 2, by e-mail

        # Spent: the reminder waits for room, it is not dropped; it says until when and why.
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
        deferred = _outcome(
            await outcomes.next(mine("cart_reminder", "notification.deferred"), timeout=20)
        )
        until = datetime.fromisoformat(deferred["until"])
        assert deferred["reason"] == "budget"
        assert datetime.now(UTC) < until <= datetime.now(UTC) + timedelta(seconds=WINDOW_S)

        # An order update is never held back by the budget (it counts in it).
        await channel.publish(
            OrderReadyForPickup(
                order_id=order_id, customer_id=customer, channel=Channel.WEB, location_id="s-1"
            )
        )
        await push_endpoint.wait_for(browser, 2)
        assert datetime.now(UTC) < until
        assert len(smtp_server.messages_to(address)) == 1

        # At its slot the window still holds two contacts (the offer, the pickup): later.
        again = _outcome(
            await outcomes.next(mine("cart_reminder", "notification.deferred"), timeout=20)
        )
        assert again["reason"] == "budget"
        assert datetime.fromisoformat(again["until"]) > until
        _, reminder = await smtp_server.wait_for(address, 2, timeout=30)
        assert reminder["Subject"] == "You left something in your cart"
        assert datetime.now(UTC) >= datetime.fromisoformat(again["until"])
        rows = await ev.settled(svc, customer, 4)
        assert sorted((r["kind"], r["status"], r["channel"]) for r in rows) == [
            ("cart_reminder", "sent", "email"),
            ("loyalty_offer_issued", "sent", "email"),
            ("order_confirmed", "sent", "push"),
            ("order_ready_for_pickup", "sent", "push"),
        ]


async def test_marketing_that_comes_due_together_goes_as_one_digest_by_mail_and_by_push(
    start_notification, channel, smtp_server, push_endpoint, omni_env, ev
) -> None:
    by_mail, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    by_push, browser = ev.uid("cust"), push_endpoint.subscribe()
    outcomes = omni_env.reader("notification.dispatched.v1")
    now = datetime.now(UTC)
    quiet = {
        # Quiet since an hour ago, over in a few seconds (UTC wall-clock time).
        "quiet_hours_start": (now - timedelta(hours=1)).time().replace(microsecond=0).isoformat(),
        "quiet_hours_end": (now + timedelta(seconds=12)).time().replace(microsecond=0).isoformat(),
        "time_zone": "UTC",
    }
    sku = ev.uid("SKU-LAMP")
    async with start_notification() as svc:
        await ev.given_profile(
            channel, svc, by_mail, email=address, preferences={**ev.MARKETING_EMAIL, **quiet}
        )
        await ev.given_profile(
            channel,
            svc,
            by_push,
            push_subscriptions=[browser],
            preferences={"consents": {"push": True}, **quiet},
        )
        for customer in (by_mail, by_push):
            await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
            await channel.publish(_offer(customer, ev))
            await channel.publish(StockAlertRequested(customer_id=customer, sku=sku))
        await ev.wait_until(lambda: _alerts(svc, sku, 2))
        await channel.publish(_back(sku))

        # Three marketing messages each, all held to the end of quiet hours ...
        held = await outcomes.collect(
            6, timeout=20, predicate=lambda r: _outcome(r)["type"] == "notification.deferred"
        )
        assert len(held) == 6
        assert {_outcome(r)["reason"] for r in held} == {"quiet_hours"}
        assert smtp_server.messages_to(address) == [] and push_endpoint.received(browser) == []

        # ... then one message each.
        (mail,) = await smtp_server.wait_for(address, timeout=30)
        assert mail["Subject"].strip().startswith("3 things for you")
        text = mail.get_body(preferencelist=("plain",)).get_content()
        assert "SKU-RED-SHOE" in text and "10% off your next order" in text and sku in text
        assert mail["List-Unsubscribe"]  # a digest of marketing is marketing
        (push,) = await push_endpoint.wait_for(browser, timeout=30)
        payload = push.json()
        assert (payload["kind"], payload["count"]) == ("digest", "3")
        assert push.headers["topic"] == payload["notification_id"].replace("-", "")[:32]

        sent = await outcomes.collect(
            6, timeout=20, predicate=lambda r: _outcome(r)["type"] == "notification.sent"
        )
        for customer in (by_mail, by_push):
            told = [_outcome(r) for r in sent if _outcome(r)["customer_id"] == customer]
            assert sorted(t["template"] for t in told) == [
                "back_in_stock",
                "cart_reminder",
                "loyalty_offer_issued",
            ]
            assert len({t["provider_message_id"] for t in told}) == 1
            assert len({t["digest_id"] for t in told}) == 1
            assert told[0]["digest_id"] in {t["notification_id"] for t in told}
        assert len(smtp_server.messages_to(address)) == 1
        assert len(push_endpoint.received(browser)) == 1
    assert push_endpoint.rejected == []


async def test_many_reminders_at_once_are_one_contact_and_the_rest_waits_for_room(
    start_notification, channel, smtp_server, ev
) -> None:
    """The old daily cap dropped the third and fourth reminder; now they come later, together."""
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification(
        notify_budget_window_hours=WINDOW_S / 3600, notify_budget_marketing=1
    ) as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        await channel.publish(ev.cart(customer, "SKU-1"))
        await smtp_server.wait_for(address)
        for sku in ("SKU-2", "SKU-3", "SKU-4"):
            await channel.publish(ev.cart(customer, sku))
        _, later = await smtp_server.wait_for(address, 2, timeout=30)
        assert later["Subject"].strip().startswith("3 things for you")
        text = later.get_body(preferencelist=("plain",)).get_content()
        assert all(sku in text for sku in ("SKU-2", "SKU-3", "SKU-4"))
        rows = await ev.settled(svc, customer, 4)
        assert [r["status"] for r in rows] == ["sent"] * 4


async def _alerts(svc: Any, sku: str, count: int) -> bool:
    async with svc.runtime.pool.acquire() as conn:
        found = await conn.fetchval("SELECT count(*) FROM stock_alerts WHERE sku = $1", sku)
    return bool(found >= count)


async def test_a_marketing_message_may_wait_for_others_to_join_its_digest(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    other = ev.uid("cust")
    async with start_notification(notify_digest_wait_s=3) as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        await ev.given_profile(channel, svc, other, email=f"{other}@example.com")
        await channel.publish(_offer(customer, ev))
        # An order update of another shopper is not held up by this one's wait.
        await channel.publish(
            OrderConfirmed(order_id=ev.uid("order"), customer_id=other, channel=Channel.WEB)
        )
        await smtp_server.wait_for(f"{other}@example.com", timeout=2)
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
        (mail,) = await smtp_server.wait_for(address, timeout=20)
        # (A long subject is folded onto the header's next line: its value starts with a space.)
        assert mail["Subject"].strip().startswith("2 things for you")
        rows = await ev.settled(svc, customer, 2)
        assert [r["status"] for r in rows] == ["sent", "sent"]
