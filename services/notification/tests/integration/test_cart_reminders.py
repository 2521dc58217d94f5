"""Abandoned carts become reminders: by e-mail into the real SMTP server, or Web Push."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from omni_contracts import (
    AvailabilityCause,
    AvailabilityChanged,
    AvailabilityStatus,
    CartCheckedOut,
    Channel,
    Fulfillment,
    OrderPlaced,
    OrderStatus,
)
from omni_devkit.testing.events import record_headers


def _dispatched(record: Any) -> dict[str, Any]:
    return {"type": record_headers(record)["ce_type"], **json.loads(record.value)}


async def test_abandoned_cart_mails_the_items_with_a_working_one_click_unsubscribe(
    start_notification, channel, smtp_server, omni_env, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    outcomes = omni_env.reader("notification.dispatched.v1")
    signals = omni_env.reader("customer.signals.v1")
    async with start_notification() as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        cart = ev.cart(customer, "SKU-RED-SHOE", "SKU-BLUE-HAT")
        await channel.publish(cart)

        (mail,) = await smtp_server.wait_for(address)
        assert mail["Subject"] == "You left something in your cart"
        text = mail.get_body(preferencelist=("plain",)).get_content()
        html = mail.get_body(preferencelist=("html",)).get_content()
        for sku in ("SKU-RED-SHOE", "SKU-BLUE-HAT"):
            assert sku in text and sku in html
        assert f"https://shop.example/cart/{cart.cart_id}" in text
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        unsubscribe = mail["List-Unsubscribe"].strip("<>")
        assert unsubscribe.startswith("http://notification.test/unsubscribe/")

        sent = await outcomes.next(lambda r: _dispatched(r)["type"] == "notification.sent")
        body = _dispatched(sent)
        assert body["channel"] == "email" and body["template"] == "cart_reminder"
        assert body["provider_message_id"] == mail["Message-ID"]

        # RFC 8058: the mail client POSTs List-Unsubscribe=One-Click, no login.
        path = unsubscribe.removeprefix("http://notification.test")
        response = await svc.http.post(
            path,
            content="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": ""},
        )
        assert response.status_code == 200, response.text
        withdrawn = await signals.next(
            lambda r: record_headers(r)["ce_type"] == "customer.preferences.updated"
        )
        prefs = json.loads(withdrawn.value)
        assert prefs["customer_id"] == customer
        assert prefs["preferences"]["consents"]["email"] is False

        # Withdrawn here at once: the next reminder is not sent.
        await channel.publish(ev.cart(customer, "SKU-GREEN-BAG"))
        rows = await ev.settled(svc, customer, 2)
        assert rows[0]["status"] == "suppressed" and rows[0]["reason"] == "no_consent"
        assert len(smtp_server.messages_to(address)) == 1

        tampered = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
        assert (await svc.http.post(tampered)).status_code == 400


async def test_a_shopper_who_prefers_push_gets_a_decryptable_web_push(
    start_notification, channel, smtp_server, push_endpoint, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    browser = push_endpoint.subscribe()
    async with start_notification() as svc:
        await ev.given_profile(
            channel,
            svc,
            customer,
            email=address,
            push_subscriptions=[browser],
            preferences=ev.MARKETING_ALL,
        )
        cart = ev.cart(customer, "SKU-RED-SHOE")
        await channel.publish(cart)
        (message,) = await push_endpoint.wait_for(browser)
        payload = message.json()
        assert payload["title"] == "You left something in your cart"
        assert payload["url"] == f"https://shop.example/cart/{cart.cart_id}"
        assert message.claims["aud"] == push_endpoint.origin
        assert message.headers["topic"] == payload["notification_id"].replace("-", "")[:32]
        (row,) = await ev.settled(svc, customer)
        assert row["status"] == "sent" and row["channel"] == "push"
        metrics = (await svc.metrics.get("/metrics")).text
        assert 'omni_notification_outcomes_total{kind="cart_reminder",outcome="sent"' in metrics
        assert 'omni_notification_provider_seconds_count{channel="push"' in metrics
    assert smtp_server.messages_to(address) == []
    assert push_endpoint.rejected == []


async def test_a_gone_push_subscription_falls_back_to_email_and_is_removed(
    start_notification, channel, smtp_server, push_endpoint, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    gone = push_endpoint.subscribe("gone")
    async with start_notification() as svc:
        await ev.given_profile(
            channel,
            svc,
            customer,
            email=address,
            push_subscriptions=[gone],
            preferences=ev.MARKETING_ALL,
        )
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
        await smtp_server.wait_for(address)
        (row,) = await ev.settled(svc, customer)
        assert row["status"] == "sent" and row["channel"] == "email"
        async with svc.runtime.pool.acquire() as conn:
            subs = await conn.fetchval(
                "SELECT push_subscriptions FROM contacts WHERE customer_id = $1", customer
            )
        assert json.loads(subs) == []


async def test_a_reminder_in_quiet_hours_waits_for_their_end_in_the_shoppers_zone(
    start_notification, channel, smtp_server, omni_env, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    zone = ZoneInfo("America/New_York")
    outcomes = omni_env.reader("notification.dispatched.v1")
    async with start_notification() as svc:
        await ev.given_profile(channel, svc, customer, email=address)
        now = datetime.now(zone)
        # Quiet since an hour ago, over in a few seconds (New York wall-clock time).
        end = (now + timedelta(seconds=8)).time().replace(microsecond=0)
        start = (now - timedelta(hours=1)).time().replace(microsecond=0)
        prefs = {
            **ev.MARKETING_EMAIL,
            "time_zone": "America/New_York",
            "quiet_hours_start": start.isoformat(),
            "quiet_hours_end": end.isoformat(),
        }
        await ev.given_profile(channel, svc, customer, version=2, email=address, preferences=prefs)
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))

        deferred = await outcomes.next(
            lambda r: record_headers(r)["ce_type"] == "notification.deferred"
        )
        until = datetime.fromisoformat(json.loads(deferred.value)["until"])
        assert until.astimezone(zone).time() == end
        assert until > datetime.now(UTC)
        assert smtp_server.messages_to(address) == []

        await smtp_server.wait_for(address, timeout=30)
        assert datetime.now(UTC) >= until
        rows = await ev.settled(svc, customer)
        assert rows[0]["status"] == "sent"


async def test_a_cart_bought_in_a_store_meanwhile_is_not_reminded(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification() as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        cart = ev.cart(customer, "SKU-RED-SHOE", "SKU-BLUE-HAT")
        # The shopper walked into a store and bought both (an in-store sale is an order).
        await channel.publish(
            OrderPlaced(
                order_id=ev.uid("sale"),
                customer_id=customer,
                channel=Channel.STORE,
                status=OrderStatus.COMPLETED,
                lines=[ev.line("SKU-RED-SHOE"), ev.line("SKU-BLUE-HAT")],
                fulfillment=Fulfillment(type="pickup", location_id="store-017"),
            )
        )
        await ev.wait_until(lambda: _bought(svc, customer))
        await channel.publish(cart)
        (row,) = await ev.settled(svc, customer)
        assert (row["status"], row["reason"]) == ("suppressed", "already_bought")

        # A cart checked out online is not reminded either, nor its second step.
        other = ev.cart(customer, "SKU-GREEN-BAG")
        await channel.publish(
            CartCheckedOut(
                cart_id=other.cart_id,
                channel=Channel.WEB,
                customer_id=customer,
                items=other.items,
                occurred_at=datetime.now(UTC),
            )
        )
        await ev.wait_until(lambda: _closed(svc, other.cart_id))
        await channel.publish(other)
        rows = await ev.settled(svc, customer, 2)
        assert (rows[0]["status"], rows[0]["reason"]) == ("suppressed", "already_bought")
    assert smtp_server.messages_to(address) == []


async def test_out_of_stock_items_are_left_out_and_none_left_offers_an_alert(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification() as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        await channel.publish(_availability("SKU-SOLD-OUT", online=0))
        await ev.wait_until(lambda: _known(svc, "SKU-SOLD-OUT"))
        await channel.publish(ev.cart(customer, "SKU-SOLD-OUT", "SKU-IN-STOCK"))
        (mail,) = await smtp_server.wait_for(address)
        text = mail.get_body(preferencelist=("plain",)).get_content()
        assert "SKU-IN-STOCK" in text and "SKU-SOLD-OUT" not in text

        await channel.publish(ev.cart(customer, "SKU-SOLD-OUT"))
        rows = await ev.settled(svc, customer, 3)
        by_kind = {(r["kind"], r["status"], r["reason"]) for r in rows}
        assert ("cart_reminder", "suppressed", "out_of_stock") in by_kind
        # The cap of two marketing messages a day is reached by the alert offer.
        assert ("stock_alert_offer", "sent", None) in by_kind
        offer = (await smtp_server.wait_for(address, 2))[-1]
        assert "SKU-SOLD-OUT" in offer.get_body(preferencelist=("plain",)).get_content()


async def test_the_second_reminder_follows_if_the_cart_is_still_abandoned(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification(cart_reminder_second_after=timedelta(seconds=1)) as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
        first, second = await smtp_server.wait_for(address, 2)
        assert first["Subject"] == "You left something in your cart"
        assert second["Subject"] == "Still thinking it over?"
        assert first["Message-ID"] != second["Message-ID"]
        rows = await ev.settled(svc, customer, 2)
        assert [r["status"] for r in rows] == ["sent", "sent"]


async def test_a_redelivered_trigger_never_sends_twice(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification() as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        cart = ev.cart(customer, "SKU-RED-SHOE")
        await channel.publish(cart)
        await channel.publish(cart)  # a new ce_id: the producer published it twice
        rows = await ev.settled(svc, customer, 2)
        assert sorted((r["status"], r["reason"]) for r in rows) == [
            ("sent", None),
            ("suppressed", "duplicate"),
        ]
    assert len(smtp_server.messages_to(address)) == 1


def _availability(
    sku: str, online: int, location: str = "wh-1", available: int | None = None
) -> AvailabilityChanged:
    available = online if available is None else available
    return AvailabilityChanged(
        sku=sku,
        location_id=location,
        on_hand=available,
        reserved=0,
        available=available,
        status=AvailabilityStatus.IN_STOCK if available else AvailabilityStatus.OUT_OF_STOCK,
        previous_status=AvailabilityStatus.OUT_OF_STOCK,
        online_available=online,
        cause=AvailabilityCause.ADJUSTMENT,
        changed_at=datetime.now(UTC),
    )


async def _bought(svc: Any, customer: str) -> bool:
    async with svc.runtime.pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT 1 FROM purchases WHERE customer_id = $1", customer))


async def _closed(svc: Any, cart_id: str) -> bool:
    async with svc.runtime.pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT 1 FROM closed_carts WHERE cart_id = $1", cart_id))


async def _known(svc: Any, sku: str) -> bool:
    async with svc.runtime.pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT 1 FROM availability WHERE sku = $1", sku))
