"""Back in stock for many shoppers: told in bounded batches, each its own transaction, resumed
by another instance after a stop, each shopper once."""

from __future__ import annotations

from datetime import UTC, datetime

from omni_contracts import AvailabilityCause, AvailabilityChanged, AvailabilityStatus

ALERTS, BATCH = 1500, 100


async def _alerts(svc, sku: str, count: int) -> list[str]:
    customers = [f"fan-{n:05d}" for n in range(count)]
    async with svc.runtime.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO stock_alerts (alert_id, customer_id, sku, location_id)"
            " SELECT 'alert-' || c, c, $2, NULL FROM unnest($1::text[]) AS c",
            customers,
            sku,
        )
    return customers


async def _told(svc, sku: str) -> tuple[int, int, int]:
    """(notifications, shoppers told, transactions that told them) for ``sku``."""
    async with svc.runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT customer_id) AS shoppers,"
            " count(DISTINCT xmin::text) AS transactions FROM notifications"
            " WHERE kind = 'back_in_stock' AND params->>'sku' = $1",
            sku,
        )
    return row["n"], row["shoppers"], row["transactions"]


def _restock(sku: str) -> AvailabilityChanged:
    return AvailabilityChanged(
        sku=sku,
        location_id="wh-1",
        on_hand=5,
        reserved=0,
        available=5,
        status=AvailabilityStatus.IN_STOCK,
        previous_status=AvailabilityStatus.OUT_OF_STOCK,
        online_available=5,
        cause=AvailabilityCause.ADJUSTMENT,
        changed_at=datetime.now(UTC),
    )


async def test_a_restock_tells_its_waiting_shoppers_in_bounded_batches_resumed_after_a_stop(
    start_notification, channel, push_endpoint, ev
) -> None:
    sku = ev.uid("SKU")
    browser = push_endpoint.subscribe()
    async with start_notification(notify_fanout_batch=BATCH) as first:
        customers = await _alerts(first, sku, ALERTS)
        # One of them can be reached: the message goes out as any other.
        await ev.given_profile(
            channel,
            first,
            customers[-1],
            push_subscriptions=[browser],
            preferences={"consents": {"push": True}},
        )
        await channel.publish(_restock(sku))

        async def partly() -> bool:
            told, _, _ = await _told(first, sku)
            return 0 < told < ALERTS

        # Stopped in the middle: what was told is committed, the rest is still to do.
        await ev.wait_until(partly, timeout=60)
    async with start_notification(notify_fanout_batch=BATCH) as second:

        async def everyone() -> bool:
            told, _, _ = await _told(second, sku)
            return told >= ALERTS

        await ev.wait_until(everyone, timeout=120)
        told, shoppers, transactions = await _told(second, sku)
        assert (told, shoppers) == (ALERTS, ALERTS)
        assert transactions >= ALERTS // BATCH
        async with second.runtime.pool.acquire() as conn:
            open_alerts = await conn.fetchval(
                "SELECT count(*) FROM stock_alerts WHERE sku = $1 AND done_at IS NULL", sku
            )
        assert open_alerts == 0
        (message,) = await push_endpoint.wait_for(browser, timeout=30)
        assert message.json()["kind"] == "back_in_stock"
