"""Rolling SIGTERM restart of every service under load, as a Kubernetes rollout does it.

All five services run as real processes (``python -m omni_common.run NAME``, what the image
runs), on the test's broker and database. While web checkouts and POS sales flow in, each
service in turn gets SIGTERM, must exit cleanly, is started again and waits for ready
before the next one goes. End: every checkout made one order and reached one outcome
(``order.confirmed`` or ``order.rejected``), no SKU oversold, every sale applied once to the
store's stock, nothing on any ``*.dlq`` topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from omni_contracts import CheckoutSubmitted, Line, Money, SaleRecorded, StockAdjusted
from omni_contracts.catalogue import TOPICS
from omni_devkit.testing.chaos import Figures, wait_for
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.plugin import TEST_API_KEY
from omni_devkit.testing.processes import ServiceProcess, service_processes

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SERVICES = ["inventory", "order", "customer-profile", "notification", "loyalty"]
WAREHOUSE, STORE = "wh-roll", "store-roll"
SKUS = [f"ROLL-{i}" for i in range(8)]
STOCK_PER_SKU = 30  # fewer than the checkouts ask for: the surplus must be refused
STORE_STOCK = 10_000
# The load lasts as long as the rollout (longer on a busy machine, where a service takes
# 15-30 s to start): kept modest so the backlog it leaves is worked off within a minute.
CHECKOUTS_PER_S = 12
SALES_PER_S = 5


def location(kind: str) -> dict[str, object]:
    return {
        "name": kind.title(),
        "kind": kind,
        "ships_online": kind == "warehouse",
        "offers_pickup": False,
        "safety_stock": 0,
        "low_stock_threshold": 1,
    }


def receipt(location_id: str, sku: str, qty: int) -> StockAdjusted:
    return StockAdjusted(
        adjustment_id=f"adj-{uuid.uuid4().hex[:12]}",
        location_id=location_id,
        sku=sku,
        kind="receipt",
        delta=qty,
        occurred_at=datetime.now(UTC),
    )


def checkout(n: int, run: str) -> CheckoutSubmitted:
    return CheckoutSubmitted.model_validate(
        {
            "checkout_id": f"chk-{run}-{n}",
            "customer_id": f"cust-{run}-{n}",
            "channel": "web",
            "lines": [
                {
                    "sku": SKUS[n % len(SKUS)],
                    "qty": 1,
                    "unit_price": {"amount": "10.00", "currency": "EUR"},
                }
            ],
            "fulfillment": {
                "type": "delivery",
                "address": {
                    "line1": "1 Rue",
                    "city": "Lyon",
                    "postal_code": "69001",
                    "country": "FR",
                },
            },
            "payment": {
                "reference": f"pay-{n}",
                "authorized": {"amount": "10.00", "currency": "EUR"},
            },
        }
    )


def sale(n: int, run: str) -> SaleRecorded:
    return SaleRecorded(
        sale_id=f"sale-{run}-{n}",
        location_id=STORE,
        customer_id=f"shopper-{run}-{n % 20}",
        lines=[
            Line(
                sku=SKUS[n % len(SKUS)],
                qty=1,
                unit_price=Money(amount=Decimal("10.00"), currency="EUR"),
            )
        ],
        occurred_at=datetime.now(UTC),
    )


async def dead_letters(bootstrap: str, prefix: str) -> dict[str, int]:
    """How many records each ``*.dlq`` topic of the catalogue holds (fresh topics: from 0)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions: list[TopicPartition] = []
        for name in TOPICS:
            topic = f"{prefix}{name}.dlq"
            await consumer._client.add_topic(topic)  # no public metadata refresh for a topic
            for p in consumer.partitions_for_topic(topic) or ():
                partitions.append(TopicPartition(topic, p))
        assert partitions, "no dead-letter topics found"
        counts: Counter[str] = Counter()
        for tp, end in (await consumer.end_offsets(partitions)).items():
            counts[tp.topic.removeprefix(prefix)] += end
        return {topic: n for topic, n in counts.items() if n}
    finally:
        await consumer.stop()


async def test_rolling_sigterm_restart_of_every_service_under_load(
    omni_env, tmp_path: Path
) -> None:
    figures = Figures("rolling SIGTERM restart of every service")
    run = uuid.uuid4().hex[:6]
    base = omni_env.settings("order", log_json=True)
    procs = service_processes(SERVICES, base, tmp_path)
    lifecycle = omni_env.reader("order.lifecycle.v1")
    db = await asyncpg.connect(omni_env.database_url)
    try:
        began = time.monotonic()
        for proc in procs.values():
            proc.start()
        await asyncio.gather(*(p.wait_ready(timeout=90) for p in procs.values()))
        figures.extra["first_start_s"] = round(time.monotonic() - began, 1)
        async with (
            ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel,
            lifecycle,
            httpx.AsyncClient(
                base_url=procs["inventory"].url,
                headers={"Authorization": f"Bearer {TEST_API_KEY}"},
                timeout=10,
            ) as inventory,
        ):
            for location_id, kind in ((WAREHOUSE, "warehouse"), (STORE, "store")):
                answer = await inventory.put(f"/locations/{location_id}", json=location(kind))
                assert answer.status_code in (200, 201), answer.text
            for sku in SKUS:
                await channel.publish(receipt(WAREHOUSE, sku, STOCK_PER_SKU))
                await channel.publish(receipt(STORE, sku, STORE_STOCK))

            async def stocked() -> bool:
                total = await db.fetchval("SELECT coalesce(sum(on_hand), 0) FROM inventory.stock")
                return total == len(SKUS) * (STOCK_PER_SKU + STORE_STOCK)

            await wait_for(stocked, timeout=30)

            sent = {"checkouts": 0, "sales": 0}
            loading = asyncio.Event()

            async def load() -> None:
                # Checkouts and sales interleaved at a steady rate until the rollout is done.
                tick = 1 / (CHECKOUTS_PER_S + SALES_PER_S)
                n = 0
                while loading.is_set():
                    if n % (CHECKOUTS_PER_S + SALES_PER_S) < CHECKOUTS_PER_S:
                        await channel.publish(checkout(sent["checkouts"], run))
                        sent["checkouts"] += 1
                    else:
                        await channel.publish(sale(sent["sales"], run))
                        sent["sales"] += 1
                    n += 1
                    await asyncio.sleep(tick)

            loading.set()
            load_task = asyncio.create_task(load())
            rollout_started = time.monotonic()
            restarts: list[str] = []
            try:
                await asyncio.sleep(2)  # under load before the first one goes
                for name in SERVICES:
                    proc: ServiceProcess = procs[name]
                    stopping = time.monotonic()
                    code = await proc.terminate(timeout=30)
                    stopped_s = time.monotonic() - stopping
                    assert proc.stopped_cleanly(code), (
                        f"{name}: exit {code}\n{proc.log_since_start()[-3000:]}"
                    )
                    proc.start()
                    ready_s = await proc.wait_ready(timeout=60)
                    restarts.append(f"{name} stop {stopped_s:.1f}s start {ready_s:.1f}s")
            finally:
                loading.clear()
                await load_task
            figures.extra["rollout_s"] = round(time.monotonic() - rollout_started, 1)
            print("[chaos] rolling restart:", "; ".join(restarts))
            figures.sent = sent["checkouts"] + sent["sales"]

            # -- every checkout: one order, one outcome ---------------------------------------
            placed: dict[str, set[str]] = defaultdict(set)  # checkout_id -> order ids
            outcomes: dict[str, set[str]] = defaultdict(set)  # order_id -> outcome ce_ids
            outcome_of: dict[str, str] = {}
            sale_orders: set[str] = set()
            records_seen: Counter[str] = Counter()

            def take(record) -> None:  # type: ignore[no-untyped-def]
                headers = record_headers(record)
                records_seen[headers["ce_id"]] += 1
                data = json.loads(record.value)
                kind = headers["ce_type"]
                if kind == "order.placed":
                    if data.get("checkout_id"):
                        placed[data["checkout_id"]].add(data["order_id"])
                    elif data["channel"] == "store":
                        sale_orders.add(data["order_id"])
                elif kind in ("order.confirmed", "order.rejected"):
                    outcomes[data["order_id"]].add(headers["ce_id"])
                    outcome_of[data["order_id"]] = kind

            async def every_checkout_decided() -> bool:
                for record in await lifecycle.collect(10_000, timeout=0.5):
                    take(record)
                orders = {o for ids in placed.values() for o in ids}
                return len(placed) >= sent["checkouts"] and orders <= outcomes.keys()

            async def progress() -> str:
                # Where the stragglers are, should the platform not converge in time.
                orders = await db.fetch(
                    'SELECT status, count(*) FROM "order".orders WHERE checkout_id LIKE $1'
                    " GROUP BY status",
                    f"chk-{run}-%",
                )
                holds = await db.fetch(
                    "SELECT state, count(*) FROM inventory.reservations GROUP BY state"
                )
                undecided = {o for ids in placed.values() for o in ids} - outcomes.keys()
                return (
                    f"sent {sent}; on the topic: {len(placed)} placed for checkouts,"
                    f" {len(outcomes)} outcomes, undecided e.g. {sorted(undecided)[:5]};"
                    f" order statuses {dict(map(tuple, orders))};"
                    f" reservations {dict(map(tuple, holds))}"
                )

            rolled_at = time.monotonic()
            try:
                await wait_for(every_checkout_decided, timeout=90, every=0.0)
            except TimeoutError:
                raise AssertionError(await progress()) from None

            async def every_sale_applied() -> bool:
                sold = await db.fetchval(
                    "SELECT $1::bigint * $2::bigint - sum(on_hand) FROM inventory.stock"
                    " WHERE location_id = $3",
                    STORE_STOCK,
                    len(SKUS),
                    STORE,
                )
                return sold >= sent["sales"]

            try:
                await wait_for(every_sale_applied, timeout=60)
            except TimeoutError:
                raise AssertionError(await progress()) from None
            figures.recovered_s = time.monotonic() - rolled_at
            # Late doubles would come now, if any: read what is left.
            for record in await lifecycle.collect(10_000, timeout=2):
                take(record)

            doubled_orders = sum(1 for ids in placed.values() if len(ids) > 1)
            doubled_outcomes = sum(1 for ids in outcomes.values() if len(ids) > 1)
            confirmed = Counter(
                SKUS[int(chk.rsplit("-", 1)[1]) % len(SKUS)]
                for chk, ids in placed.items()
                for order in ids
                if outcome_of.get(order) == "order.confirmed"
            )
            oversold = {sku: n for sku, n in confirmed.items() if n > STOCK_PER_SKU}
            store_sold = await db.fetchval(
                "SELECT $1::bigint * $2::bigint - sum(on_hand) FROM inventory.stock"
                " WHERE location_id = $3",
                STORE_STOCK,
                len(SKUS),
                STORE,
            )
            stock = await db.fetch(
                "SELECT sku, on_hand, reserved FROM inventory.stock WHERE location_id = $1",
                WAREHOUSE,
            )

            # Customer-profile and loyalty saw each order and sale once too (their keys forbid
            # twice, so only a lost one can show): a purchase per order, points per sale.
            async def others_caught_up() -> bool:
                seen = await db.fetchrow(
                    "SELECT (SELECT count(*) FROM customer_profile.purchases"
                    "        WHERE customer_id LIKE $1) AS web,"
                    " (SELECT count(*) FROM customer_profile.purchases"
                    "  WHERE customer_id LIKE $2) AS store,"
                    " (SELECT count(*) FROM loyalty.earnings e JOIN loyalty.orders o"
                    "  USING (order_id) WHERE o.channel = 'store') AS earned",
                    f"cust-{run}-%",
                    f"shopper-{run}-%",
                )
                assert seen is not None
                others.update(seen)
                return tuple(seen) == (sent["checkouts"], sent["sales"], sent["sales"])

            others: dict[str, int] = {}
            with contextlib.suppress(TimeoutError):
                await wait_for(others_caught_up, timeout=30)
            figures.applied = sum(len(ids) for ids in outcomes.values()) + int(store_sold)
            figures.duplicates = (
                doubled_orders + doubled_outcomes + max(0, int(store_sold) - sent["sales"])
            )
            figures.dead_lettered = sum(
                (dlq := await dead_letters(omni_env.bootstrap, omni_env.prefix)).values()
            )
            figures.extra.update(
                checkouts=sent["checkouts"],
                sales=sent["sales"],
                confirmed=sum(confirmed.values()),
                rejected=sum(1 for k in outcome_of.values() if k == "order.rejected"),
                stocked_units=STOCK_PER_SKU * len(SKUS),
                oversold_skus=len(oversold),
                sale_orders=len(sale_orders),
                republished=sum(n - 1 for n in records_seen.values()),
                profile_purchases=others.get("web", 0) + others.get("store", 0),
                loyalty_earnings=others.get("earned", 0),
            )
            figures.report()
            print("[chaos] rolling restart, final state:", await progress())
            assert doubled_orders == 0, "a checkout made two orders"
            assert doubled_outcomes == 0, "an order got two outcomes"
            assert len(placed) == sent["checkouts"]
            assert not oversold, oversold
            assert all(r["on_hand"] >= r["reserved"] >= 0 for r in stock), stock
            assert store_sold == sent["sales"], "a sale was lost or applied twice"
            assert len(sale_orders) == sent["sales"]
            assert figures.dead_lettered == 0, dlq
            assert others == {
                "web": sent["checkouts"],
                "store": sent["sales"],
                "earned": sent["sales"],
            }, "customer-profile or loyalty missed an order or a sale"
    finally:
        await db.close()
        for proc in procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                await proc.terminate(timeout=15)
            proc.close()
