"""Reservations for online orders, against the real broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from inventory_service.service import handlers
from inventory_service.service.handlers import Inventory
from omni_contracts import (
    Channel,
    OrderCancelled,
    OrderConfirmed,
    OrderPickedUp,
    OrderReturnReceived,
    OrderShipped,
    ReturnLine,
)
from omni_devkit.testing.events import record_headers

pytestmark = pytest.mark.integration

RESERVATIONS = "inventory.reservations.v1"
AVAILABILITY = "inventory.availability.v1"


def body(record: Any) -> dict[str, Any]:
    return json.loads(record.value)


def ce_type(record: Any) -> str:
    return record_headers(record)["ce_type"].rsplit(".", 1)[-1]


NOW = datetime.now(UTC)


async def stock_row(runtime: Any, sku: str, location_id: str) -> tuple[int, int]:
    row = await runtime.pool.fetchrow(
        "SELECT on_hand, reserved FROM stock WHERE sku = $1 AND location_id = $2", sku, location_id
    )
    return (row["on_hand"], row["reserved"])


async def assigned_partitions(runtime: Any) -> int:
    """How many partitions of the order lifecycle this instance consumes right now."""
    count = 0
    for subscriber in runtime.kafka.broker.subscribers:
        consumer = getattr(subscriber, "consumer", None)
        if consumer is not None:
            count += sum(
                1 for tp in consumer.assignment() if tp.topic.endswith("order.lifecycle.v1")
            )
    return count


async def test_500_pickups_race_for_10_units_across_two_instances(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory() as first, start_inventory() as second:
        await first.http.put("/locations/store-1", json=ev.location_body())
        reservations = omni_env.reader(RESERVATIONS)
        availability = omni_env.reader(AVAILABILITY)
        async with reservations, availability:
            await channel.publish(ev.receipt("store-1", "CONSOLE", 10))
            assert await availability.collect(1, timeout=20)
            # Both replicas must be consuming (the group has split the partitions).
            await ev.wait_until(lambda: _both_assigned(first.runtime, second.runtime), timeout=60)

            orders = [ev.order(("CONSOLE", 1), pickup_at="store-1") for _ in range(500)]
            started = time.perf_counter()
            await asyncio.gather(*(channel.publish(o) for o in orders))
            answers = await reservations.collect(500, timeout=90)
            elapsed = time.perf_counter() - started

        outcomes = Counter(ce_type(r) for r in answers)
        assert len(answers) == 500, outcomes
        assert {r.key.decode() for r in answers} == {o.order_id for o in orders}
        assert outcomes == {"confirmed": 10, "rejected": 490}
        for record in answers:
            if ce_type(record) == "rejected":
                assert body(record)["reason"] == "out_of_stock"
                assert body(record)["shortages"] == [
                    {"sku": "CONSOLE", "requested": 1, "available": 0}
                ]
            else:
                assert body(record)["allocations"] == [
                    {"sku": "CONSOLE", "location_id": "store-1", "qty": 1}
                ]
        assert await stock_row(first.runtime, "CONSOLE", "store-1") == (10, 10)
        answer = (await first.http.get("/availability/CONSOLE")).json()
        assert (answer["locations"][0]["available"], answer["locations"][0]["status"]) == (
            0,
            "out_of_stock",
        )

        handled = [_handled(svc.runtime, "order.placed") for svc in (first, second)]
        assert all(handled) and sum(handled) == 500, handled
        (lost,) = (await second.http.get("/lost-demand")).json()
        assert (lost["sku"], lost["location_id"], lost["units"], lost["orders"]) == (
            "CONSOLE",
            "store-1",
            490,
            490,
        )
        assert lost["revenue"] == {"amount": "4900.00", "currency": "EUR"}
        lost_units = sum(
            svc.runtime.metrics.registry.get_sample_value(
                "omni_inventory_lost_demand_units_total", {"service": "inventory"}
            )
            or 0
            for svc in (first, second)
        )
        assert lost_units == 490
        print(f"500 reservations answered by two instances in {elapsed:.2f}s ({handled})")


async def _both_assigned(*runtimes: Any) -> bool:
    counts = [await assigned_partitions(rt) for rt in runtimes]
    return all(counts) and sum(counts) == 6


def _handled(runtime: Any, event_type: str) -> int:
    metric = runtime.metrics.events_handled
    return int(metric.labels("inventory", "order.lifecycle.v1", event_type, "handled")._value.get())


async def test_multi_sku_orders_in_opposite_orders_do_not_deadlock(start_inventory, ev) -> None:
    """Orders naming A then B and B then A, reserving concurrently on many connections."""
    async with start_inventory(db_pool_max=12) as inventory:
        await inventory.http.put("/locations/wh-1", json=ev.location_body("warehouse"))
        await inventory.http.put("/locations/store-1", json=ev.location_body())
        runtime = inventory.runtime
        inv = Inventory(lock_namespace=runtime.settings.schema)
        async with runtime.transaction() as tx:
            for sku in ("A", "B", "C"):
                for location_id in ("wh-1", "store-1"):
                    await handlers.adjust_stock(inv, tx, ev.receipt(location_id, sku, 50))

        async def place(lines: tuple[tuple[str, int], ...]) -> None:
            async with runtime.transaction() as tx:
                await handlers.reserve(inv, tx, [(ev.order(*lines), None)], now=NOW)

        shapes = [
            (("A", 1), ("B", 1), ("C", 1)),
            (("C", 1), ("B", 1), ("A", 1)),
            (("B", 2), ("A", 1)),
        ]
        orders = [shapes[i % 3] for i in range(60)]
        await asyncio.wait_for(asyncio.gather(*(place(o) for o in orders)), timeout=60)

        states = await runtime.pool.fetch("SELECT state, count(*) FROM reservations GROUP BY 1")
        totals = await runtime.pool.fetch(
            "SELECT sku, sum(on_hand)::int AS on_hand, sum(reserved)::int AS reserved"
            " FROM stock GROUP BY 1"
        )
    assert {r["state"]: r["count"] for r in states} == {"held": 60}
    # 20 orders of each shape: every unit asked for is held, none twice, none lost.
    assert {r["sku"]: (r["on_hand"], r["reserved"]) for r in totals} == {
        "A": (100, 60),
        "B": (100, 80),
        "C": (100, 40),
    }


async def test_an_unconfirmed_reservation_expires_and_says_so(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory(inventory_reservation_ttl_s=1.0) as inventory:
        await inventory.http.put("/locations/store-1", json=ev.location_body())
        reservations = omni_env.reader(RESERVATIONS)
        availability = omni_env.reader(AVAILABILITY)
        async with reservations, availability:
            await channel.publish(ev.receipt("store-1", "LAMP", 3))
            (stocked,) = await availability.collect(1, timeout=20)
            lapsing = ev.order(("LAMP", 2), pickup_at="store-1")
            kept = ev.order(("LAMP", 1), pickup_at="store-1")
            placed = await channel.publish(lapsing)
            await channel.publish(kept)
            confirmed = await reservations.collect(2, timeout=20)
            assert [ce_type(r) for r in confirmed] == ["confirmed", "confirmed"]
            await channel.publish(
                OrderConfirmed(order_id=kept.order_id, customer_id="cust-1", channel=Channel.WEB)
            )

            (released,) = await reservations.collect(1, timeout=15)
            assert ce_type(released) == "released"
            assert body(released)["order_id"] == lapsing.order_id
            assert body(released)["reason"] == "expired"
            # Released by a timer, yet still part of the order's journey.
            assert record_headers(released)["correlation_id"] == placed.correlation_id
            assert body(released)["allocations"] == [
                {"sku": "LAMP", "location_id": "store-1", "qty": 2}
            ]
            told = [stocked, *await availability.collect(3, timeout=10)]
            assert [body(r)["cause"] for r in told] == [
                "adjustment",
                "reservation",
                "reservation",
                "release",
            ]
            assert body(told[-1])["available"] == 2

            # The confirmed order held on past its expiry, and is picked up.
            assert await reservations.collect(1, timeout=1.5) == []
            assert await stock_row(inventory.runtime, "LAMP", "store-1") == (3, 1)
            await channel.publish(
                OrderPickedUp(order_id=kept.order_id, customer_id="cust-1", channel=Channel.WEB)
            )
            (fulfilled,) = await availability.collect(1, timeout=10)
        assert body(fulfilled)["cause"] == "fulfillment"
        assert await stock_row(inventory.runtime, "LAMP", "store-1") == (2, 0)


async def test_cancelling_releases_and_shipping_takes_stock_off_hand(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory() as inventory:
        await inventory.http.put("/locations/wh-1", json=ev.location_body("warehouse"))
        await inventory.http.put("/locations/store-1", json=ev.location_body())
        reservations = omni_env.reader(RESERVATIONS)
        async with reservations:
            await channel.publish(ev.receipt("wh-1", "TENT", 2))
            await channel.publish(ev.receipt("store-1", "TENT", 2))
            await ev.wait_until(lambda: _count_rows(inventory.runtime, on_hand=2, rows=2))
            # No single location has 3: split, most stock first, ties by location_id.
            split = ev.order(("TENT", 3))
            cancelled = ev.order(("TENT", 1))
            await channel.publish(split)
            (answer,) = await reservations.collect(1, timeout=20)
            assert sorted((a["location_id"], a["qty"]) for a in body(answer)["allocations"]) == [
                ("store-1", 2),
                ("wh-1", 1),
            ]
            await channel.publish(cancelled)
            await channel.publish(
                OrderCancelled(
                    order_id=cancelled.order_id,
                    customer_id="cust-1",
                    channel=Channel.WEB,
                    reason="changed my mind",
                )
            )
            await channel.publish(
                OrderShipped(order_id=split.order_id, customer_id="cust-1", channel=Channel.WEB)
            )
            answers = await reservations.collect(2, timeout=20)
            assert [ce_type(r) for r in answers] == ["confirmed", "released"]
            assert body(answers[1])["reason"] == "order_cancelled: changed my mind"
            await ev.wait_until(lambda: _state(inventory.runtime, split.order_id, "fulfilled"))
        rows = await inventory.runtime.pool.fetch(
            "SELECT location_id, on_hand, reserved FROM stock WHERE sku = 'TENT' ORDER BY 1"
        )
        assert [tuple(r) for r in rows] == [("store-1", 0, 0), ("wh-1", 1, 0)]


async def test_an_order_cancelled_with_the_longest_reason_still_releases_its_stock(
    omni_env, start_inventory, channel, ev
) -> None:
    """The release says why, with the order's own words: a reason at the contract's bound
    must not make the release an invalid event (the stock stayed held on the old code)."""
    async with start_inventory() as inventory:
        await inventory.http.put("/locations/wh-1", json=ev.location_body("warehouse"))
        reservations = omni_env.reader(RESERVATIONS)
        async with reservations:
            await channel.publish(ev.receipt("wh-1", "KITE", 1))
            await ev.wait_until(lambda: _count_rows(inventory.runtime, on_hand=1, rows=1))
            order = ev.order(("KITE", 1))
            await channel.publish(order)
            (held,) = await reservations.collect(1, timeout=20)
            assert ce_type(held) == "confirmed"
            await channel.publish(
                OrderCancelled(
                    order_id=order.order_id,
                    customer_id="cust-1",
                    channel=Channel.WEB,
                    reason="r" * 200,
                )
            )
            (released,) = await reservations.collect(1, timeout=20)
        assert ce_type(released) == "released"
        assert body(released)["reason"].startswith("order_cancelled: rrr")
        assert len(body(released)["reason"]) == 200
        assert await stock_row(inventory.runtime, "KITE", "wh-1") == (1, 0)


async def _count_rows(runtime: Any, *, on_hand: int, rows: int) -> bool:
    found = await runtime.pool.fetchval("SELECT count(*) FROM stock WHERE on_hand = $1", on_hand)
    return bool(found == rows)


async def _state(runtime: Any, order_id: str, state: str) -> bool:
    found = await runtime.pool.fetchval(
        "SELECT state FROM reservations WHERE order_id = $1", order_id
    )
    return bool(found == state)


async def test_a_return_handed_in_at_another_store_restocks_that_store(
    omni_env, start_inventory, channel, ev
) -> None:
    async with start_inventory() as inventory:
        await inventory.http.put("/locations/store-1", json=ev.location_body())
        await inventory.http.put("/locations/store-2", json=ev.location_body())
        availability = omni_env.reader(AVAILABILITY)
        async with availability:
            await channel.publish(ev.receipt("store-1", "JACKET", 1))
            await channel.publish(ev.receipt("store-1", "SCARF", 1))
            stocked = await availability.collect(2, timeout=20)
            bought = ev.order(("JACKET", 1), ("SCARF", 1), pickup_at="store-1")
            await channel.publish(bought)
            await channel.publish(
                OrderPickedUp(order_id=bought.order_id, customer_id="cust-1", channel=Channel.WEB)
            )
            returned = OrderReturnReceived(
                order_id=bought.order_id,
                customer_id="cust-1",
                channel=Channel.STORE,
                return_id=ev.uid("return"),
                location_id="store-2",
                lines=[
                    ReturnLine(sku="JACKET", qty=1, resellable=True),
                    ReturnLine(sku="SCARF", qty=1, resellable=False, reason="torn"),
                ],
            )
            await channel.publish(returned)
            await channel.publish(returned)  # told twice (new ce_id): restocked once
            told = [*stocked, *await availability.collect(5, timeout=20)]
            assert await availability.collect(1, timeout=1.5) == []

        restocked = [body(r) for r in told if body(r)["cause"] == "return"]
        assert [(e["sku"], e["location_id"], e["on_hand"]) for e in restocked] == [
            ("JACKET", "store-2", 1)
        ]
        assert restocked[0]["previous_status"] == "out_of_stock"
        assert await stock_row(inventory.runtime, "JACKET", "store-1") == (0, 0)
        assert await stock_row(inventory.runtime, "SCARF", "store-1") == (0, 0)


async def test_lost_demand_report_lists_the_biggest_losses_first(start_inventory, ev) -> None:
    async with start_inventory() as inventory:
        http = inventory.http
        await http.put("/locations/store-1", json=ev.location_body())
        runtime = inventory.runtime
        inv = Inventory(lock_namespace=runtime.settings.schema)
        async with runtime.transaction() as tx:
            await handlers.adjust_stock(inv, tx, ev.receipt("store-1", "TV", 1))
            await handlers.reserve(
                inv, tx, [(ev.order(("TV", 3), price="499.00"), None)], now=NOW
            )  # 2 short
            await handlers.reserve(
                inv, tx, [(ev.order(("SOCKS", 10), price="2.50"), None)], now=NOW
            )
            await handlers.reserve(
                inv, tx, [(ev.order(("TV", 1), pickup_at="store-1"), None)], now=NOW
            )  # 1 held
            await handlers.reserve(
                inv, tx, [(ev.order(("TV", 1), pickup_at="store-1", price="450"), None)], now=NOW
            )
        report = (await http.get("/lost-demand", params={"limit": 2})).json()
        assert [
            (r["sku"], r["location_id"], r["units"], r["revenue"]["amount"]) for r in report
        ] == [
            ("TV", None, 2, "998.00"),
            ("TV", "store-1", 1, "450.00"),
        ]
        everything = (await http.get("/lost-demand")).json()
        assert [r["sku"] for r in everything] == ["TV", "TV", "SOCKS"]
