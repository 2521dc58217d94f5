"""``omni bench loyalty``: ledger throughput, and what loyalty in the saga costs a checkout.

Two figures, each next to a baseline measured in the same run on the same broker:

- ledger: ``order.lifecycle.v1`` events (in-store sales of known shoppers, each earning
  points) applied per second by the loyalty service, against a bare consumer reading the
  same events from the same topic;
- checkouts: checkouts confirmed per second by order + inventory + loyalty when each redeems
  points (loyalty a required saga participant), against the same services confirming
  checkouts that redeem nothing.

The services run in this process (order and inventory found through the ``omni.services``
entry points, as ``omni run`` finds them). Uses ``KAFKA_BOOTSTRAP_SERVERS`` and
``DATABASE_URL`` when both are set, else starts an embedded Tansu and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from omni_common.service import service_factories
from omni_common.settings import ServiceSettings
from omni_common.topics import create_topics
from omni_contracts import (
    CheckoutSubmitted,
    Event,
    OrderPlaced,
    StockAdjusted,
)
from omni_contracts.envelope import encode, new_envelope
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError, free_port
from omni_devkit.testing.services import RunningService, running

from loyalty_service.entrypoints.app import create_app as create_loyalty
from loyalty_service.settings import LoyaltySettings

WAREHOUSE = "bench-wh"
SKUS = 16
POINTS = 100  # redeemed per checkout (1.00 at the default point value)


@dataclass(frozen=True)
class BenchWorld:
    """A broker, a database server and a topic prefix for one run."""

    bootstrap: str
    server_url: str
    prefix: str

    async def settings(self, service: str) -> ServiceSettings:
        """Settings of one in-process service, with its own database."""
        from omni_devkit.devstack.postgres import create_database

        name = f"{self.prefix.strip('.')}_{service}"
        return ServiceSettings(
            service_name=service,
            kafka_bootstrap_servers=self.bootstrap,
            database_url=await create_database(self.server_url, name),
            topic_prefix=self.prefix,
            api_keys="bench=bench-key",
            log_json=False,
            log_level="WARNING",
        )


@contextlib.contextmanager
def _infrastructure() -> Iterator[tuple[str, str]]:
    bootstrap, database = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("DATABASE_URL")
    if bootstrap and database:
        yield bootstrap, database
        return
    from omni_devkit.devstack.kafka import TansuBroker
    from omni_devkit.devstack.postgres import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="omni-bench-"))
    broker = TansuBroker(free_port(), log_path=root / "tansu.log")
    postgres = EmbeddedPostgres(root / "pgdata", free_port(), fast=True)
    broker.start()
    postgres.start()
    try:
        yield broker.bootstrap_servers, postgres.url()
    finally:
        postgres.stop()
        broker.stop()


class Publisher:
    """Publishes contract events to prefixed topics, pipelined."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.prefix = prefix
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)

    async def __aenter__(self) -> Publisher:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def publish_all(self, events: list[Event]) -> None:
        """Send every event, then wait for every acknowledgement."""
        pending = []
        for event in events:
            envelope = new_envelope(event, source="/bench")
            pending.append(
                await self._producer.send(
                    self.prefix + event.topic,
                    encode(event),
                    key=event.partition_key().encode(),
                    headers=[(k, v.encode()) for k, v in envelope.headers().items()],
                )
            )
        await asyncio.gather(*pending)


async def _count_records(
    bootstrap: str, topic: str, wanted: int, match: Callable[[Any], bool], within_s: float
) -> float:
    """Seconds a bare consumer takes to read ``wanted`` matching records from the start."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        while not partitions:
            await asyncio.sleep(0.05)
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or set()
        assigned = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        started = time.perf_counter()
        seen = 0
        while seen < wanted:
            if time.perf_counter() - started > within_s:
                raise DevStackError(f"only {seen} of {wanted} records on {topic}")
            for records in (await consumer.getmany(timeout_ms=200)).values():
                seen += sum(1 for r in records if match(r))
        return time.perf_counter() - started
    finally:
        await consumer.stop()


async def _until(read: Callable[[], Any], done: Callable[[Any], bool], within_s: float) -> None:
    deadline = time.perf_counter() + within_s
    while not done(await read()):
        if time.perf_counter() > deadline:
            raise DevStackError("the services did not finish in time")
        await asyncio.sleep(0.05)


def _sale(customer: str, euros: str) -> OrderPlaced:
    return OrderPlaced(
        order_id=f"ord_{uuid.uuid4().hex}",
        customer_id=customer,
        channel="store",
        status="completed",
        lines=[{"sku": "BENCH-FUND", "qty": 1, "unit_price": {"amount": euros, "currency": "EUR"}}],
        fulfillment={"type": "pickup", "location_id": "bench-store"},
    )


def _checkout(customer: str, seq: int, points: int | None) -> CheckoutSubmitted:
    return CheckoutSubmitted(
        checkout_id=f"chk-{uuid.uuid4().hex}",
        customer_id=customer,
        channel="web",
        lines=[
            {
                "sku": f"BENCH-{seq % SKUS}",
                "qty": 1,
                "unit_price": {"amount": "10.00", "currency": "EUR"},
            }
        ],
        fulfillment={"type": "pickup", "location_id": WAREHOUSE},
        payment={"reference": f"pay-{seq}", "authorized": {"amount": "10.00", "currency": "EUR"}},
        points_to_redeem=points,
    )


async def _confirmed(order: RunningService, customers: list[str]) -> int:
    return int(
        await order.runtime.pool.fetchval(
            "SELECT count(*) FROM orders WHERE customer_id = ANY($1::text[])"
            " AND status IN ('confirmed', 'rejected')",
            customers,
        )
    )


async def measure(
    world: BenchWorld, *, entries: int, checkouts: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """Run both measurements; the figures ``--json`` prints."""
    await create_topics(world.bootstrap, prefix=world.prefix)
    factories = service_factories()
    loyalty_settings = LoyaltySettings.from_settings(
        await world.settings("loyalty"), loyalty_pending_days=0, loyalty_timer_poll_s=0.05
    )
    previous = os.environ.get("LOYALTY_IN_SAGA")
    os.environ["LOYALTY_IN_SAGA"] = "true"  # read by the order service's own settings
    try:
        order_app = factories["order"].load()(await world.settings("order"))
    finally:
        if previous is None:
            os.environ.pop("LOYALTY_IN_SAGA", None)
        else:
            os.environ["LOYALTY_IN_SAGA"] = previous
    inventory_app = factories["inventory"].load()(await world.settings("inventory"))
    lifecycle = world.prefix + "order.lifecycle.v1"

    async with (
        running(inventory_app, api_key="bench-key") as inventory,
        running(order_app, api_key="bench-key") as order,
        running(create_loyalty(loyalty_settings), api_key="bench-key") as loyalty,
        Publisher(world.bootstrap, world.prefix) as publisher,
    ):
        # -- ledger entries per second from order.lifecycle.v1 --------------------------------
        say(f"ledger: {entries} in-store sales of known shoppers on order.lifecycle.v1 ...")
        shoppers = [f"bench-ledger-{i}" for i in range(max(1, entries // 10))]
        sales = [_sale(shoppers[i % len(shoppers)], "12.00") for i in range(entries)]
        ledger_count = "SELECT count(*) FROM ledger WHERE kind = 'pending'"
        before = await loyalty.runtime.pool.fetchval(ledger_count)
        started = time.perf_counter()
        await publisher.publish_all(list(sales))
        await _until(
            lambda: loyalty.runtime.pool.fetchval(ledger_count),
            lambda n: n - before >= entries,
            within_s=120 + entries / 20,
        )
        ledger_s = time.perf_counter() - started
        sale_ids = {s.order_id.encode() for s in sales}
        raw_s = await _count_records(
            world.bootstrap, lifecycle, entries, lambda r: r.key in sale_ids, within_s=120
        )

        # -- checkouts with and without loyalty in the saga -----------------------------------
        say(f"checkouts: stock, and {checkouts} shoppers with points ...")
        response = await inventory.http.put(
            f"/locations/{WAREHOUSE}",
            json={
                "name": "Bench",
                "kind": "warehouse",
                "ships_online": True,
                "offers_pickup": True,
            },
        )
        response.raise_for_status()
        await publisher.publish_all(
            [
                StockAdjusted(
                    adjustment_id=f"adj-{uuid.uuid4().hex}",
                    location_id=WAREHOUSE,
                    sku=f"BENCH-{i}",
                    kind="receipt",
                    delta=10 * checkouts + 100,
                    occurred_at=datetime.now(UTC),
                )
                for i in range(SKUS)
            ]
        )
        spenders = [f"bench-spender-{uuid.uuid4().hex[:8]}" for _ in range(checkouts)]
        await publisher.publish_all([_sale(c, f"{POINTS}.00") for c in spenders])
        await _until(
            lambda: loyalty.runtime.pool.fetchval(
                "SELECT count(*) FROM accounts WHERE customer_id = ANY($1::text[])"
                " AND available >= $2",
                spenders,
                POINTS,
            ),
            lambda n: n >= checkouts,
            within_s=120 + checkouts / 10,
        )
        await asyncio.sleep(1.0)  # stock receipts settled

        rates: dict[str, float] = {}
        confirmed: dict[str, int] = {}
        for phase, customers, points in (
            ("without", [f"bench-plain-{uuid.uuid4().hex[:8]}" for _ in range(checkouts)], None),
            ("with", spenders, POINTS),
        ):
            say(f"checkouts {phase} loyalty in the saga: {checkouts} ...")
            started = time.perf_counter()
            await publisher.publish_all([_checkout(c, i, points) for i, c in enumerate(customers)])
            await _until(
                lambda cs=customers: _confirmed(order, cs),
                lambda n: n >= checkouts,
                within_s=120 + checkouts / 5,
            )
            rates[phase] = checkouts / (time.perf_counter() - started)
            confirmed[phase] = int(
                await order.runtime.pool.fetchval(
                    "SELECT count(*) FROM orders WHERE customer_id = ANY($1::text[])"
                    " AND status = 'confirmed'",
                    customers,
                )
            )
    return {
        "entries": entries,
        "ledger_entries_per_s": round(entries / ledger_s, 1),
        "raw_consume_per_s": round(entries / raw_s, 1),
        "checkouts": checkouts,
        "checkouts_per_s_without_loyalty": round(rates["without"], 1),
        "checkouts_per_s_with_loyalty": round(rates["with"], 1),
        "confirmed_without_loyalty": confirmed["without"],
        "confirmed_with_loyalty": confirmed["with"],
        "saga_cost_ratio": round(rates["with"] / rates["without"], 2),
    }


@contextlib.asynccontextmanager
async def _world(bootstrap: str, database: str) -> AsyncIterator[BenchWorld]:
    yield BenchWorld(bootstrap, database, f"bench{uuid.uuid4().hex[:8]}.")


@bench_app.command("loyalty")
def bench_loyalty(
    entries: int = typer.Option(1000, min=10, help="order.lifecycle.v1 events for the ledger"),
    checkouts: int = typer.Option(200, min=10, help="checkouts per phase"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON line"),
) -> None:
    """Ledger entries/s from order.lifecycle.v1; checkouts/s with loyalty in the saga vs not."""

    def say(line: str) -> None:
        if not as_json:
            typer.echo(line, err=True)

    # The services run in this process: their per-message logs would drown the figures.
    logging.getLogger("faststream").setLevel(logging.WARNING)

    async def run(bootstrap: str, database: str) -> dict[str, Any]:
        async with _world(bootstrap, database) as world:
            return await measure(world, entries=entries, checkouts=checkouts, say=say)

    try:
        with _infrastructure() as (bootstrap, database):
            result = asyncio.run(run(bootstrap, database))
    except (DevStackError, OSError) as exc:
        fail(f"bench loyalty: {exc}")
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(
        f"ledger: {result['ledger_entries_per_s']} entries/s applied from order.lifecycle.v1"
        f" (bare consumer: {result['raw_consume_per_s']} events/s)"
    )
    typer.echo(
        f"checkouts: {result['checkouts_per_s_with_loyalty']}/s with loyalty in the saga vs"
        f" {result['checkouts_per_s_without_loyalty']}/s without"
        f" (ratio {result['saga_cost_ratio']}; confirmed {result['confirmed_with_loyalty']}"
        f" and {result['confirmed_without_loyalty']} of {result['checkouts']})"
    )
