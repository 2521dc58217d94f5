"""Stock at stores and warehouses, as channels see it on inventory.availability.v1.

Real broker and PostgreSQL: events go in on the inbound topics, assertions read what
inventory published and what its API answers.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from inventory_service.entrypoints.app import seed_from_file
from inventory_service.service.handlers import Inventory
from omni_devkit.testing.events import ce_headers, record_headers

# Also run on Tansu in CI: the zero-install path stays proven.
pytestmark = [pytest.mark.integration, pytest.mark.tansu]

AVAILABILITY = "inventory.availability.v1"


def body(record: Any) -> dict[str, Any]:
    return json.loads(record.value)


async def test_last_unit_sold_at_a_store_goes_out_of_stock_on_web_and_app(
    omni_env, start_inventory, channel, ev
) -> None:
    """The headline story: the store sells its last unit; web and app stop offering it."""
    async with start_inventory() as inventory:
        http = inventory.http
        assert (await http.put("/locations/store-1", json=ev.location_body())).status_code == 201
        await http.put("/locations/wh-1", json=ev.location_body("warehouse", safety_stock=1))
        availability = omni_env.reader(AVAILABILITY)
        async with availability:
            await channel.publish(ev.receipt("store-1", "SHOES-42", 1))
            await channel.publish(ev.receipt("wh-1", "SHOES-42", 4))
            received = await availability.collect(2, timeout=20)
            assert [body(r)["online_available"] for r in received] == [1, 4]

            sold = await channel.publish(ev.sale("store-1", ("SHOES-42", 1)))
            (told,) = await availability.collect(1, timeout=10)

        event = body(told)
        assert told.key == b"SHOES-42"
        assert record_headers(told)["ce_type"] == "inventory.availability.changed"
        assert record_headers(told)["causation_id"] == sold.id
        assert {k: event[k] for k in ("location_id", "status", "previous_status", "cause")} == {
            "location_id": "store-1",
            "status": "out_of_stock",
            "previous_status": "low_stock",
            "cause": "sale",
        }
        assert (event["on_hand"], event["reserved"], event["available"]) == (0, 0, 0)
        # The warehouse still ships 4 - 1 safety stock: what web and app may sell now.
        assert event["online_available"] == 3

        answer = (await http.get("/availability/SHOES-42")).json()
        assert answer["online_available"] == 3
        per_location = {row["location_id"]: row["status"] for row in answer["locations"]}
        assert per_location == {"store-1": "out_of_stock", "wh-1": "in_stock"}

        # Not on the API, whatever the key: on the metrics port, which Prometheus scrapes.
        assert (await http.get("/metrics")).status_code == 404
        metrics = (await inventory.metrics.get("/metrics")).text
        assert (
            'omni_inventory_out_of_stock_transitions_total{location_id="store-1",'
            'service="inventory"} 1.0' in metrics
        )
        assert "omni_inventory_stock_to_availability_seconds_count" in metrics


async def test_a_sale_beyond_recorded_stock_is_a_fact_and_asks_for_a_recount(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory() as inventory:
        http = inventory.http
        await http.put("/locations/store-1", json=ev.location_body())
        availability = omni_env.reader(AVAILABILITY)
        async with availability:
            await channel.publish(ev.receipt("store-1", "MUG", 1))
            assert await availability.collect(1, timeout=20)
            await channel.publish(ev.sale("store-1", ("MUG", 3), ("NEVER-STOCKED", 1)))
            (sold,) = await availability.collect(1, timeout=10)  # MUG: NEVER-STOCKED stays 0
            assert (body(sold)["sku"], body(sold)["on_hand"]) == ("MUG", 0)

            open_ones = (await http.get("/discrepancies")).json()
            assert sorted((d["sku"], d["sold"], d["shortfall"]) for d in open_ones) == [
                ("MUG", 3, 2),
                ("NEVER-STOCKED", 1, 1),
            ]
            stock = (await http.get("/locations/store-1/availability")).json()["items"]
            assert {row["sku"]: row["on_hand"] for row in stock} == {"MUG": 0, "NEVER-STOCKED": 0}

            # A recount settles the discrepancy of that shelf.
            count = ev.adjustment("store-1", "MUG", "count", counted=2)
            await channel.publish(count)
            (counted,) = await availability.collect(1, timeout=10)
        assert (body(counted)["on_hand"], body(counted)["cause"]) == (2, "adjustment")
        still_open = (await http.get("/discrepancies")).json()
        assert [d["sku"] for d in still_open] == ["NEVER-STOCKED"]
        assert len((await http.get("/discrepancies", params={"open": "false"})).json()) == 2


async def test_refused_events_go_to_the_dlq_with_a_reason_and_never_block(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory() as inventory:
        await inventory.http.put("/locations/store-1", json=ev.location_body())
        sales_dlq = omni_env.reader("store.sales.v1.dlq")
        adjustments_dlq = omni_env.reader("inventory.adjustments.v1.dlq")
        availability = omni_env.reader(AVAILABILITY)
        async with sales_dlq, adjustments_dlq, availability:
            await channel.publish(ev.receipt("store-1", "A", 2))
            (_stocked,) = await availability.collect(1, timeout=20)
            await inventory.runtime.pool.execute(
                "UPDATE stock SET reserved = 1 WHERE sku = 'A'"  # one unit held for an order
            )

            await channel.publish(ev.sale("store-404", ("A", 1)))
            negative = ev.sale("store-1", ("A", 1)).model_dump(mode="json")
            negative["lines"][0]["qty"] = -2
            await channel.publish_raw(
                "store.sales.v1",
                json.dumps(negative).encode(),
                key="store-1",
                headers=ce_headers("store.sale.recorded"),
            )
            await channel.publish(ev.receipt("store-404", "A", 5))
            await channel.publish(ev.adjustment("store-1", "A", "damage", delta=-3))
            await channel.publish(ev.adjustment("store-1", "A", "count", counted=0))
            # ...and the partition moves on: a valid sale after the refusals is handled.
            await channel.publish(ev.sale("store-1", ("A", 1)))

            dead_sales = await sales_dlq.collect(2, timeout=20)
            dead_adjustments = await adjustments_dlq.collect(3, timeout=20)
            (after,) = await availability.collect(1, timeout=10)

        def reasons(records: list[Any]) -> list[str]:
            return sorted(record_headers(r)["dlq_reason"] for r in records)

        assert reasons(dead_sales) == ["schema_violation", "unknown_location"]
        assert reasons(dead_adjustments) == [
            "impossible_adjustment",
            "impossible_count",
            "unknown_location",
        ]
        errors = " ".join(record_headers(r)["dlq_error"] for r in dead_adjustments)
        assert "store-404" in errors and "reserved" in errors
        assert (body(after)["on_hand"], body(after)["reserved"]) == (1, 1)


async def test_a_safety_stock_change_is_told_to_web_and_app(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory() as inventory:
        http = inventory.http
        await http.put("/locations/store-1", json=ev.location_body())
        availability = omni_env.reader(AVAILABILITY)
        async with availability:
            await channel.publish(ev.receipt("store-1", "A", 10))
            (_stocked,) = await availability.collect(1, timeout=20)
            changed = await http.put("/locations/store-1", json=ev.location_body(safety_stock=4))
            assert changed.status_code == 200
            (told,) = await availability.collect(1, timeout=10)
        assert (body(told)["online_available"], body(told)["safety_stock"]) == (6, 4)
        assert (await http.get("/availability/A")).json()["online_available"] == 6


async def test_demo_seed_is_loaded_at_start_and_never_overwrites_live_stock(
    start_inventory,
) -> None:
    async with start_inventory(inventory_seed_file="demo") as inventory:
        http = inventory.http
        locations = (await http.get("/locations")).json()
        assert {loc["kind"] for loc in locations} == {"store", "warehouse"}
        assert len(locations) >= 3
        shirts = (await http.get("/availability/TSHIRT-BLUE-M")).json()
        assert shirts["online_available"] > 0
        assert await inventory.runtime.pool.fetchval("SELECT count(*) FROM outbox") > 0

        await inventory.runtime.pool.execute(
            "UPDATE stock SET on_hand = 1 WHERE sku = 'TSHIRT-BLUE-M' AND location_id = 'store-001'"
        )
        # What every later start (of any instance) does: seeding again keeps live stock.
        runtime = inventory.runtime
        await seed_from_file(runtime, Inventory(), "demo", default_threshold=5)
        again = (await http.get("/availability/TSHIRT-BLUE-M")).json()
        assert {r["location_id"]: r["on_hand"] for r in again["locations"]}["store-001"] == 1
        assert len((await http.get("/locations")).json()) == len(locations)
