"""Order updates, back in stock, loyalty, bad input, erasure and the send's idempotency."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from omni_contracts import (
    AvailabilityCause,
    AvailabilityChanged,
    AvailabilityStatus,
    Channel,
    Money,
    OfferIssued,
    OrderConfirmed,
    OrderDelayed,
    OrderReadyForPickup,
    OrderStatus,
    ProfileErased,
    ProfilesMerged,
    RefundIssued,
    StockAlertRequested,
)
from omni_devkit.testing.events import record_headers


def _restock(sku: str, location: str, available: int, online: int) -> AvailabilityChanged:
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


async def test_an_order_delay_reaches_the_shopper_in_their_language_and_zone(
    start_notification, channel, smtp_server, omni_env, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    promised = datetime(2026, 12, 3, 17, 0, tzinfo=UTC)
    outcomes = omni_env.reader("notification.dispatched.v1")
    async with start_notification() as svc:
        # Transactional: no explicit consent needed, only no explicit no.
        await ev.given_profile(
            channel,
            svc,
            customer,
            email=address,
            preferences={"language": "fr-FR", "time_zone": "Europe/Paris"},
        )
        order_id = ev.uid("order")
        await channel.publish(
            OrderDelayed(
                order_id=order_id,
                customer_id=customer,
                channel=Channel.WEB,
                status=OrderStatus.SHIPPED,
                promised_by=promised,
                eta=promised + timedelta(days=1),
            )
        )
        (mail,) = await smtp_server.wait_for(address)
        assert mail["Subject"] == f"Votre commande {order_id} a du retard"
        text = mail.get_body(preferencelist=("plain",)).get_content()
        assert "2026-12-04 18:00 CET" in text  # the new ETA, in Paris time
        assert mail["List-Unsubscribe"] is None  # transactional: no marketing unsubscribe
        sent = await outcomes.next(lambda r: record_headers(r)["ce_type"] == "notification.sent")
        assert record_headers(sent)["ce_subject"] == customer
        (row,) = await ev.settled(svc, customer)
        assert (row["kind"], row["language"], row["purpose"]) == (
            "order_delayed",
            "fr",
            "transactional",
        )


async def test_ready_for_pickup_names_the_store_and_refunds_are_confirmed(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification() as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences={"language": "de"}
        )
        order_id = ev.uid("order")
        await channel.publish(
            OrderReadyForPickup(
                order_id=order_id,
                customer_id=customer,
                channel=Channel.WEB,
                location_id="store-017",
            )
        )
        await channel.publish(
            RefundIssued(
                order_id=order_id,
                customer_id=customer,
                channel=Channel.WEB,
                return_id="ret-1",
                amount=Money(amount=Decimal("19.90"), currency="EUR"),
            )
        )
        first, second = await smtp_server.wait_for(address, 2)
        # No German templates: the default language.
        assert first["Subject"] == f"Your order {order_id} is ready for pickup"
        assert "store-017" in first.get_body(preferencelist=("plain",)).get_content()
        assert "19.90 EUR" in second.get_body(preferencelist=("plain",)).get_content()
        await ev.settled(svc, customer, 2)


async def test_a_back_in_stock_alert_fires_once_when_the_store_restocks(
    start_notification, channel, smtp_server, push_endpoint, ev
) -> None:
    customer = ev.uid("cust")
    app_token = push_endpoint.fcm_token()
    async with start_notification() as svc:
        await ev.given_profile(
            channel,
            svc,
            customer,
            push_tokens=[app_token],
            preferences={"consents": {"push": True}},
        )
        await channel.publish(
            StockAlertRequested(customer_id=customer, sku="SKU-LAMP", location_id="store-017")
        )
        await ev.wait_until(lambda: _alert(svc, customer))
        # Another store's restock, and online stock, do not answer a store alert.
        await channel.publish(_restock("SKU-LAMP", "store-099", available=5, online=5))
        await channel.publish(_restock("SKU-LAMP", "store-017", available=3, online=8))
        await channel.publish(_restock("SKU-LAMP", "store-017", available=6, online=11))
        (row,) = await ev.settled(svc, customer)
        assert (row["kind"], row["status"], row["channel"]) == ("back_in_stock", "sent", "push")
        await ev.wait_until(lambda: push_endpoint.fcm_messages)
        (fcm,) = push_endpoint.fcm_messages
        assert fcm.project == "omni-test" and fcm.token == app_token
        assert fcm.message["notification"]["title"] == "SKU-LAMP is back in stock"
        assert fcm.message["data"]["kind"] == "back_in_stock"
        assert fcm.message["android"]["collapse_key"]
        assert len(await ev.notifications(svc, customer)) == 1


async def test_a_loyalty_offer_is_delivered_and_shown_in_the_next_cart_reminder(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification() as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        await channel.publish(
            OfferIssued(
                customer_id=customer,
                points=0,
                balance=120,
                reason="tier_gift",
                offer_id=ev.uid("offer"),
                description="10% off your next order",
                reward="10%",
                valid_until=datetime.now(UTC) + timedelta(days=7),
            )
        )
        await smtp_server.wait_for(address)
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
        offer_mail, reminder = await smtp_server.wait_for(address, 2)
        assert offer_mail["Subject"] == "A personal offer for you"
        assert (
            "10% off your next order" in reminder.get_body(preferencelist=("plain",)).get_content()
        )
        await ev.settled(svc, customer, 2)


async def test_bad_input_gets_a_clear_outcome(
    start_notification, channel, smtp_server, push_endpoint, omni_env, tmp_path, ev
) -> None:
    invalid, malformed, templateless = ev.uid("cust"), ev.uid("cust"), ev.uid("cust")
    # Operator templates without the delay notice.
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "order_confirmed.txt").write_text(
        "{% block subject %}x{% endblock %}{% block push %}x{% endblock %}"
        "{% block text %}x{% endblock %}"
    )
    (tmp_path / "en" / "order_confirmed.html").write_text("<p>x</p>")
    dlq = omni_env.reader("customer.profile.v1.dlq")
    async with start_notification(notify_templates_dir=str(tmp_path)) as svc:
        await ev.given_profile(channel, svc, invalid, email="not-an-address")
        # A subscription whose keys are not a P-256 point: accepted by the contract's
        # shape, refused when encrypting.
        broken = push_endpoint.subscribe()
        broken["keys"]["p256dh"] = "bm90LWEta2V5"
        await ev.given_profile(channel, svc, malformed, push_subscriptions=[broken])
        await ev.given_profile(channel, svc, templateless, email=f"{ev.uid('s')}@example.com")
        # A subscription that is not one at all never reaches the contact list.
        await channel.publish_raw(
            "customer.profile.v1",
            json.dumps(
                {"customer_id": malformed, "push_subscriptions": [{"endpoint": "x"}]}
            ).encode(),
            key=malformed,
            headers=_ce("customer.profile.updated"),
        )
        for customer in (invalid, malformed):
            await channel.publish(
                OrderConfirmed(order_id=ev.uid("order"), customer_id=customer, channel=Channel.WEB)
            )
        await channel.publish(
            OrderDelayed(
                order_id=ev.uid("order"),
                customer_id=templateless,
                channel=Channel.WEB,
                status=OrderStatus.SHIPPED,
                promised_by=datetime.now(UTC),
                eta=datetime.now(UTC) + timedelta(days=1),
            )
        )
        # Codes, never a provider's words (those are in the log).
        (row,) = await ev.settled(svc, invalid)
        assert (row["status"], row["reason"]) == ("failed", "email:invalid_address")
        (row,) = await ev.settled(svc, malformed)
        assert (row["status"], row["reason"]) == ("failed", "push:invalid_address")
        (row,) = await ev.settled(svc, templateless)
        assert (row["status"], row["reason"]) == ("failed", "unknown_template")
        dead = await dlq.next()
        assert record_headers(dead)["dlq_reason"]


async def test_erasure_forgets_contacts_and_message_bodies(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification() as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
        await smtp_server.wait_for(address)
        await ev.settled(svc, customer)
        await channel.publish(ProfileErased(customer_id=customer))

        async def erased() -> bool:
            async with svc.runtime.pool.acquire() as conn:
                contact = await conn.fetchval(
                    "SELECT count(*) FROM contacts WHERE customer_id = $1", customer
                )
                bodies = await conn.fetchval(
                    "SELECT count(*) FROM notifications WHERE customer_id = $1"
                    " AND (body IS NOT NULL OR params IS NOT NULL OR subject IS NOT NULL)",
                    customer,
                )
                timers = await conn.fetchval(
                    "SELECT count(*) FROM timers WHERE payload->>'customer_id' = $1", customer
                )
            return contact == 0 and bodies == 0 and timers == 0

        await ev.wait_until(erased)
        await channel.publish(ev.cart(customer, "SKU-BLUE-HAT"))
        rows = await ev.settled(svc, customer, 2)
        assert (rows[0]["status"], rows[0]["reason"]) == ("suppressed", "no_contact")


async def test_a_send_interrupted_by_a_crash_is_resent_once_with_the_same_message_id(
    start_notification, channel, smtp_server, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    async with start_notification(notify_send_lease_s=2.0, notify_delivery_deadline_s=1.5) as svc:
        await ev.given_profile(
            channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL
        )
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
        (first,) = await smtp_server.wait_for(address)
        (row,) = await ev.settled(svc, customer)
        # As if the process died after the provider accepted and before the outcome commit.
        async with svc.runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE notifications SET status = 'sending', claimed_at = now()"
                " WHERE notification_id = $1",
                row["notification_id"],
            )
        _, resent = await smtp_server.wait_for(address, 2)
        assert resent["Message-ID"] == first["Message-ID"]
        await ev.wait_until(lambda: _status(svc, row["notification_id"], "sent"))
        # Interrupted a second time: failed, never a third copy.
        async with svc.runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE notifications SET status = 'sending', claimed_at = now()"
                " WHERE notification_id = $1",
                row["notification_id"],
            )
        await ev.wait_until(lambda: _status(svc, row["notification_id"], "failed"))
        assert len(smtp_server.messages_to(address)) == 2


async def test_a_rate_limited_push_service_is_retried_with_backoff(
    start_notification, channel, push_endpoint, ev
) -> None:
    customer = ev.uid("cust")
    flaky = push_endpoint.subscribe("flaky", failures=2)
    async with start_notification() as svc:
        await ev.given_profile(
            channel,
            svc,
            customer,
            push_subscriptions=[flaky],
            preferences={"consents": {"push": True}},
        )
        await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
        (message,) = await push_endpoint.wait_for(flaky)
        assert message.json()["kind"] == "cart_reminder"
        (row,) = await ev.settled(svc, customer)
        assert row["status"] == "sent" and row["attempts"] == 1


async def test_no_consent_and_no_contact_are_suppressed_with_the_reason(
    start_notification, channel, omni_env, ev
) -> None:
    silent, unknown = ev.uid("cust"), ev.uid("cust")
    outcomes = omni_env.reader("notification.dispatched.v1")
    async with start_notification() as svc:
        await ev.given_profile(channel, svc, silent, email=f"{ev.uid('s')}@example.com")
        await channel.publish(ev.cart(silent, "SKU-RED-SHOE"))  # marketing: no yes given
        await channel.publish(ev.cart(unknown, "SKU-RED-SHOE"))
        (row,) = await ev.settled(svc, silent)
        assert (row["status"], row["reason"]) == ("suppressed", "no_consent")
        (row,) = await ev.settled(svc, unknown)
        assert (row["status"], row["reason"]) == ("suppressed", "no_contact")
        reasons = {json.loads(r.value)["reason"] for r in await outcomes.collect(2, timeout=10)}
        assert reasons == {"no_consent", "no_contact"}
        response = await svc.http.get(
            f"/customers/{silent}/notifications", headers={"Authorization": ""}
        )
        assert response.status_code == 401


def _ce(ce_type: str) -> dict[str, str]:
    from omni_devkit.testing.events import ce_headers

    return ce_headers(ce_type)


async def _alert(svc: Any, customer: str) -> bool:
    async with svc.runtime.pool.acquire() as conn:
        return bool(
            await conn.fetchval("SELECT 1 FROM stock_alerts WHERE customer_id = $1", customer)
        )


async def _status(svc: Any, notification_id: str, status: str) -> bool:
    async with svc.runtime.pool.acquire() as conn:
        return (
            await conn.fetchval(
                "SELECT status FROM notifications WHERE notification_id = $1", notification_id
            )
        ) == status


async def test_a_merge_moves_alerts_to_the_surviving_profile(
    start_notification, channel, push_endpoint, ev
) -> None:
    anonymous, survivor = ev.uid("cust"), ev.uid("cust")
    browser = push_endpoint.subscribe()
    async with start_notification() as svc:
        await ev.given_profile(channel, svc, anonymous)
        await channel.publish(StockAlertRequested(customer_id=anonymous, sku="SKU-MUG"))
        await ev.wait_until(lambda: _alert(svc, anonymous))
        await channel.publish(ProfilesMerged(surviving_id=survivor, merged_ids=[anonymous]))
        await ev.given_profile(
            channel,
            svc,
            survivor,
            push_subscriptions=[browser],
            preferences={"consents": {"push": True}},
        )
        await ev.wait_until(lambda: _alert(svc, survivor))
        await channel.publish(_restock("SKU-MUG", "wh-1", available=2, online=2))
        (message,) = await push_endpoint.wait_for(browser)
        assert message.json()["kind"] == "back_in_stock"
        assert await ev.notifications(svc, anonymous) == []


async def test_fcm_tokens_come_from_a_service_account_and_are_refreshed(
    start_notification, channel, push_endpoint, tmp_path, ev
) -> None:
    # Google's tokens live an hour; two seconds here.
    account = push_endpoint.service_account(project="omni-shop", expires_in=2)
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(account))
    customer, app_token = ev.uid("cust"), push_endpoint.fcm_token()
    async with start_notification(
        fcm_access_token=None, fcm_project_id=None, fcm_service_account_file=str(key_file)
    ) as svc:
        await ev.given_profile(channel, svc, customer, push_tokens=[app_token])

        async def confirmed(count: int) -> None:
            await channel.publish(
                OrderConfirmed(order_id=ev.uid("order"), customer_id=customer, channel=Channel.WEB)
            )
            await ev.wait_until(lambda: len(push_endpoint.fcm_messages) >= count)

        await confirmed(1)
        await asyncio.sleep(2.5)  # the first token has expired: a new one is fetched first
        await confirmed(2)
        push_endpoint.revoke_tokens()  # FCM refuses the current one: fetched again, once
        await confirmed(3)
        rows = await ev.settled(svc, customer, 3)
    assert [r["status"] for r in rows] == ["sent"] * 3
    assert {m.project for m in push_endpoint.fcm_messages} == {"omni-shop"}
    assert len({m.authorization for m in push_endpoint.fcm_messages}) == 3
    assert push_endpoint.rejected == []


async def test_a_burst_of_order_news_tells_each_shopper_once_per_news(
    start_notification, channel, smtp_server, ev
) -> None:
    """Order news arriving together is decided as a lot: every shopper hears of each order
    once, a producer's second copy in the same burst is a duplicate, and the shoppers' own
    language still applies."""
    shoppers = {ev.uid("cust"): f"{ev.uid('shopper')}@example.com" for _ in range(4)}
    async with start_notification() as svc:
        for customer, address in shoppers.items():
            await ev.given_profile(channel, svc, customer, email=address)
        news = [
            OrderConfirmed(order_id=ev.uid("order"), customer_id=c, channel=Channel.WEB)
            for c in shoppers
        ]
        # The first shopper's confirmation is published twice (two ce_ids, one order).
        await asyncio.gather(*(channel.publish(n) for n in [*news, news[0]]))
        first = next(iter(shoppers))
        for customer, address in shoppers.items():
            rows = await ev.settled(svc, customer, 2 if customer == first else 1)
            expected = [("sent", None)] + (
                [("suppressed", "duplicate")] if customer == first else []
            )
            assert sorted((r["status"], r["reason"]) for r in rows) == expected
            (mail,) = await smtp_server.wait_for(address)
            assert "order" in mail["Subject"].lower()
        await asyncio.sleep(0.3)
        assert len(smtp_server.messages_to(shoppers[first])) == 1
