"""Send once: a delivery is over before its lease ends, so push services that never answer
cannot make two instances send the same message; and a claim taken over is fenced."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from notification_service.adapters.repository import NotificationRepository
from omni_contracts import Channel, OrderConfirmed

# A lease of seconds stands for the minute of production; the deadline is inside it.
LEASE = {
    "notify_send_lease_s": 6.0,
    "notify_delivery_deadline_s": 5.0,
    "notify_push_timeout_s": 1.0,
    "notify_send_attempts": 2,
}


async def test_push_services_that_never_answer_still_mean_one_message_per_shopper(
    start_notification, channel, smtp_server, push_endpoint, ev
) -> None:
    shoppers = {ev.uid("cust"): f"{ev.uid('shopper')}@example.com" for _ in range(4)}
    async with (
        start_notification(notify_dispatch_concurrency=4, **LEASE) as one,
        start_notification(notify_dispatch_concurrency=4, **LEASE) as other,
    ):
        for customer, address in shoppers.items():
            await ev.given_profile(
                channel,
                one,
                customer,
                email=address,
                push_subscriptions=[push_endpoint.subscribe("hang")],
                preferences={"preferred_channel": "push"},
            )
        for customer in shoppers:
            await channel.publish(
                OrderConfirmed(order_id=ev.uid("order"), customer_id=customer, channel=Channel.WEB)
            )
        for address in shoppers.values():
            await smtp_server.wait_for(address, timeout=60)
        # Long enough for any claim of a send still hanging to have run out several times.
        await asyncio.sleep(3 * LEASE["notify_send_lease_s"])
        for customer, address in shoppers.items():
            assert len(smtp_server.messages_to(address)) == 1, customer
            (row,) = await ev.settled(one, customer)
            assert (row["status"], row["channel"], row["attempts"]) == ("sent", "email", 1)
        assert push_endpoint.hanging >= len(shoppers)
        assert other.runtime.ready


async def test_an_outcome_is_recorded_only_by_the_claim_that_holds_the_message(
    start_notification, omni_env, ev
) -> None:
    async with start_notification():
        pass  # its schema, migrated; no dispatcher of its own in the way
    customer = ev.uid("cust")
    conn = await asyncpg.connect(
        omni_env.database_url, server_settings={"search_path": "notification"}
    )
    try:
        await conn.execute(
            "INSERT INTO notifications (notification_id, customer_id, kind, purpose, status)"
            " VALUES ($1, $2, 'order_confirmed', 'transactional', 'pending')",
            str(uuid.uuid4()),
            customer,
        )
        repo = NotificationRepository(conn)
        first = await repo.claim(lease_s=60)
        assert first is not None
        # Its lease ran out (the instance froze): another claim takes it over.
        await conn.execute("UPDATE notifications SET claimed_at = now() - interval '2 min'")
        second = await repo.claim(lease_s=60)
        assert second is not None and second.taken_over
        # The frozen instance wakes up: its outcome is not recorded.
        notification_id = first.row.notification_id
        assert not await repo.finish(notification_id, first.token, "sent", channel="email")
        assert await repo.finish(notification_id, second.token, "sent", channel="push")
        status, channel_ = await conn.fetchrow(
            "SELECT status, channel FROM notifications WHERE customer_id = $1", customer
        )
    finally:
        await conn.close()
    assert (status, channel_) == ("sent", "push")


async def test_a_send_in_flight_when_the_erasure_lands_writes_nothing_back(
    start_notification, omni_env, ev
) -> None:
    async with start_notification():
        pass  # its schema, migrated; no dispatcher of its own in the way
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    conn = await asyncpg.connect(
        omni_env.database_url, server_settings={"search_path": "notification"}
    )
    try:
        await conn.execute(
            "INSERT INTO notifications (notification_id, customer_id, kind, purpose, status)"
            " VALUES ($1, $2, 'order_confirmed', 'transactional', 'pending')",
            str(uuid.uuid4()),
            customer,
        )
        await conn.execute(
            "INSERT INTO dead_timers (kind, key, due_at, payload, trace, attempts, last_error)"
            " VALUES ('cart.reminder', $1, now(), $2, '{}', 5, $3)",
            ev.uid("cart"),
            f'{{"customer_id": "{customer}"}}',
            f"refused {address}",
        )
        repo = NotificationRepository(conn)
        claim = await repo.claim(lease_s=60)
        assert claim is not None and claim.row.customer_id == customer
        await repo.erase(customer)
        # The delivery ends after the erasure: its subject and body are not written back.
        held = await repo.finish(
            claim.row.notification_id,
            claim.token,
            "sent",
            channel="email",
            subject=f"Hello {address}",
            body=f"Sent to {address}",
        )
        row = await conn.fetchrow(
            "SELECT status, reason, subject, body FROM notifications WHERE customer_id = $1",
            customer,
        )
        dead = await conn.fetchval(
            "SELECT count(*) FROM dead_timers WHERE payload->>'customer_id' = $1", customer
        )
    finally:
        await conn.close()
    assert not held
    assert dict(row) == {"status": "suppressed", "reason": "erased", "subject": None, "body": None}
    assert dead == 0
