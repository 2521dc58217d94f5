"""A location's policy change at a location of many SKUs: told in bounded batches.

One transaction taking an advisory lock per SKU of the location overflowed PostgreSQL's
shared lock table (``max_locks_per_transaction`` times the connections) and failed with
SQLSTATE 53200 (out of shared memory).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from inventory_service.domain import Location, LocationKind
from inventory_service.service.handlers import Inventory

pytestmark = pytest.mark.integration

AVAILABILITY = "inventory.availability.v1"
# More SKUs than one transaction of the test server can lock, with room to spare.
MANY_SKUS = 45_000


def body(record: Any) -> dict[str, Any]:
    return json.loads(record.value)


async def test_a_policy_change_at_a_location_of_many_skus_is_told_within_the_lock_table(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory() as inventory:
        http, pool = inventory.http, inventory.runtime.pool
        await http.put("/locations/wh-1", json=ev.location_body("warehouse"))
        await http.put("/locations/store-1", json=ev.location_body())
        availability = omni_env.reader(AVAILABILITY)
        async with availability:
            await channel.publish(ev.receipt("wh-1", "A", 10))
            await channel.publish(ev.receipt("store-1", "A", 3))
            await channel.publish(ev.receipt("wh-1", "B", 1))
            await availability.collect(3, timeout=20)
            # The long tail of a warehouse: SKUs once stocked, none on hand now.
            await pool.execute(
                "INSERT INTO stock (sku, location_id) SELECT 'TAIL-' || g, 'wh-1'"
                " FROM generate_series(1, $1) AS g",
                MANY_SKUS,
            )
            changed = await http.put(
                "/locations/wh-1", json=ev.location_body("warehouse", safety_stock=4)
            )
            assert changed.status_code == 200, changed.text
            told = await availability.collect(2, timeout=20)
            assert await availability.collect(1, timeout=2) == []
        # A: what the warehouse keeps above its new safety stock, and the store's units;
        # B: its only unit is held back now.
        seen = {b["sku"]: (b["online_available"], b["safety_stock"]) for b in map(body, told)}
        assert seen == {"A": (9, 4), "B": (0, 4)}
        assert body(next(r for r in told if body(r)["sku"] == "B"))["location_id"] == "wh-1"
        assert (await http.get("/availability/A")).json()["online_available"] == 9
        assert await pool.fetchval("SELECT count(*) FROM location_policy_changes") == 0


async def test_a_policy_change_cut_short_is_told_by_its_timer(
    omni_env, start_inventory, channel, ev
) -> None:
    """The process that saved the change died before telling it: any instance's timer
    wheel tells the rest."""
    async with start_inventory(inventory_policy_batch=2) as inventory:
        http, runtime = inventory.http, inventory.runtime
        await http.put("/locations/wh-1", json=ev.location_body("warehouse"))
        availability = omni_env.reader(AVAILABILITY)
        async with availability:
            for sku in ("A", "B", "C", "D", "E"):
                await channel.publish(ev.receipt("wh-1", sku, 2))
            await availability.collect(5, timeout=20)
            from inventory_service.service.locations import begin_location_change

            location = Location("wh-1", "A location", LocationKind.WAREHOUSE, ships_online=False)
            async with runtime.transaction() as tx:
                # Saved, with its timer armed as due now, and nothing told yet: a crash here.
                await begin_location_change(
                    Inventory(lock_namespace=runtime.settings.schema),
                    tx,
                    location,
                    tell_by=datetime.now(UTC),
                )
            told = await availability.collect(5, timeout=20)
            assert await availability.collect(1, timeout=2) == []
        assert sorted(body(r)["sku"] for r in told) == ["A", "B", "C", "D", "E"]
        assert {body(r)["online_available"] for r in told} == {0}
        pool = runtime.pool
        assert await pool.fetchval("SELECT count(*) FROM location_policy_changes") == 0
        assert not await pool.fetchval(
            "SELECT count(*) FROM timers WHERE kind = 'location-policy' AND due_at <= now()"
        )


async def test_a_deadlock_between_a_location_change_and_a_sale_is_retried_not_a_500(
    omni_env, start_inventory, channel, ev
) -> None:
    """The change's batch locks SKU A, then its version row; a sale-like transaction holds
    that row and asks for A's lock. PostgreSQL breaks the cycle by failing the change's
    transaction (40P01): the request runs again and succeeds."""
    import asyncio

    import asyncpg
    import httpx
    from omni_devkit.testing.plugin import TEST_API_KEY

    async with start_inventory() as inventory:
        http, runtime = inventory.http, inventory.runtime
        await http.put("/locations/wh-1", json=ev.location_body("warehouse"))
        availability = omni_env.reader(AVAILABILITY)
        async with availability:
            await channel.publish(ev.receipt("wh-1", "A", 10))
            await availability.collect(1, timeout=20)
            sale = await asyncpg.connect(runtime.settings.database_url.get_secret_value())
            try:
                tx = sale.transaction()
                await tx.start()
                await sale.execute(f"SET LOCAL search_path TO {runtime.settings.schema}")
                # The request is the one PostgreSQL fails: this side detects no deadlock.
                await sale.execute("SET LOCAL deadlock_timeout = '60s'")
                await sale.execute("UPDATE sku_versions SET version = version WHERE sku = 'A'")
                transport = httpx.ASGITransport(app=inventory.app, raise_app_exceptions=False)
                async with httpx.AsyncClient(
                    transport=transport,
                    base_url="http://service",
                    headers={"Authorization": f"Bearer {TEST_API_KEY}"},
                ) as client:
                    change = asyncio.create_task(
                        client.put(
                            "/locations/wh-1", json=ev.location_body("warehouse", safety_stock=4)
                        )
                    )

                    async def change_waits_for_the_row() -> bool:
                        return bool(
                            await runtime.pool.fetchval(
                                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a"
                                " USING (pid) WHERE NOT l.granted AND l.locktype = 'transactionid'"
                                " AND a.datname = current_database()"
                            )
                        )

                    await ev.wait_until(change_waits_for_the_row, timeout=20)
                    # Now the other way round: A's lock, which the change's batch holds.
                    await asyncio.wait_for(
                        sale.execute(
                            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                            f"{runtime.settings.schema}.sku:A",
                        ),
                        timeout=20,
                    )  # granted: PostgreSQL failed the change's transaction
                    await tx.commit()
                    answered = await asyncio.wait_for(change, timeout=20)
            finally:
                await sale.close()
            assert answered.status_code == 200, answered.text
            (told,) = await availability.collect(1, timeout=20)
        assert (body(told)["sku"], body(told)["online_available"]) == ("A", 6)
