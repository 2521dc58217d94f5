"""Facts apply once by their own ids, and a stock count applies as of when it was made."""

from __future__ import annotations

from datetime import timedelta

import pytest

pytestmark = pytest.mark.integration


async def test_resent_facts_with_fresh_ce_ids_apply_once_and_counts_apply_as_of_their_time(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory() as inventory:
        await inventory.http.put("/locations/store-1", json=ev.location_body())
        pool = inventory.runtime.pool

        async def on_hand() -> int | None:
            return await pool.fetchval(
                "SELECT on_hand FROM stock WHERE sku = 'MUG' AND location_id = 'store-1'"
            )

        async def settles_at(value: int) -> None:
            await ev.wait_until(lambda: _equals(on_hand, value), timeout=20)

        receipt = ev.receipt("store-1", "MUG", 10)
        await channel.publish(receipt)
        await channel.publish(receipt)  # the stock system resends it with a fresh ce_id
        await settles_at(10)  # (sales come on another topic: no order between the two)
        sale = ev.sale("store-1", ("MUG", 2))
        await channel.publish(sale)
        await channel.publish(sale)  # the till resends it with a fresh ce_id
        await settles_at(8)

        # The shelf is counted at 12:00; a sale rung up at 11:59 reaches us after the count.
        count = ev.adjustment("store-1", "MUG", "count", counted=5)
        count = count.model_copy(update={"occurred_at": ev.NOW + timedelta(hours=2)})
        await channel.publish(count)
        await settles_at(5)
        before = ev.sale("store-1", ("MUG", 1))
        before = before.model_copy(update={"occurred_at": ev.NOW + timedelta(hours=1, minutes=59)})
        after = ev.sale("store-1", ("MUG", 1))
        after = after.model_copy(update={"occurred_at": ev.NOW + timedelta(hours=2, minutes=1)})
        await channel.publish(before)  # already left out of the count: not subtracted again
        await channel.publish(after)
        # An older count arriving late does not overwrite the newer one.
        stale = ev.adjustment("store-1", "MUG", "count", counted=50)
        stale = stale.model_copy(update={"occurred_at": ev.NOW + timedelta(hours=1)})
        await channel.publish(stale)
        await settles_at(4)
        marker = ev.receipt("store-1", "MUG", 1)
        marker = marker.model_copy(update={"occurred_at": ev.NOW + timedelta(hours=3)})
        await channel.publish(marker)  # everything before it on this key is handled
        await settles_at(5)
        assert await pool.fetchval("SELECT count(*) FROM applied_facts") == 7


async def _equals(read, value: int) -> bool:
    return await read() == value


async def test_availability_events_carry_a_rising_per_sku_version(
    omni_env, start_inventory, channel, ev
) -> None:
    import json

    async with start_inventory() as inventory:
        await inventory.http.put("/locations/store-1", json=ev.location_body())
        await inventory.http.put("/locations/store-2", json=ev.location_body())
        out = omni_env.reader("inventory.availability.v1")
        async with out:
            await channel.publish(ev.receipt("store-1", "CUP", 5))
            await channel.publish(ev.receipt("store-2", "CUP", 5))
            await channel.publish(ev.receipt("store-1", "PLATE", 5))
            await channel.publish(ev.sale("store-1", ("CUP", 1), ("PLATE", 1)))
            told = [json.loads(r.value) for r in await out.collect(5, timeout=20)]
        versions: dict[str, list[int]] = {}
        for event in told:
            versions.setdefault(event["sku"], []).append(event["version"])
        assert versions == {"CUP": [1, 2, 3], "PLATE": [1, 2]}


async def test_old_business_keys_are_purged(omni_env, start_inventory, ev) -> None:
    async with start_inventory() as inventory:
        pool = inventory.runtime.pool
        await pool.execute(
            "INSERT INTO applied_facts (kind, fact_id, applied_at) VALUES"
            " ('sale', 'old', now() - interval '40 days'), ('sale', 'recent', now())"
        )
        await inventory.runtime.relay.stop()
        await inventory.runtime.relay.start()  # purges on its first idle round

        async def purged() -> bool:
            ids = {r["fact_id"] for r in await pool.fetch("SELECT fact_id FROM applied_facts")}
            return ids == {"recent"}

        await ev.wait_until(purged, timeout=15)
