"""``omni bench loyalty``: ledger throughput, and what loyalty in the saga costs a checkout.

Two figures, each next to a baseline measured in the same run on the same stack:

- ledger: in-store sales of known shoppers published on ``order.lifecycle.v1`` (as order
  publishes them), and the ``loyalty.ledger.v1`` entries they earn counted as they arrive in
  a consumer group of the bench's own: entries/s, against the raw broker's round trip rate;
- checkouts: N checkouts redeeming points published at once and their outcomes counted on
  ``order.lifecycle.v1`` (order + inventory + loyalty, loyalty a required participant),
  against N checkouts redeeming nothing through the same services.

Runs against the dev stack when one is up, else a private stack of inventory, order and
loyalty. The stack must run order with ``LOYALTY_IN_SAGA=true`` and loyalty with
``LOYALTY_PENDING_DAYS=0`` (bench shoppers' points must be spendable at once): a private
stack is started so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from omni_contracts import (
    LOYALTY_LEDGER,
    ORDER_LIFECYCLE,
    CheckoutSubmitted,
    Event,
    OrderPlaced,
    StockAdjusted,
)

from omni_devkit.bench.kit import (
    StackTarget,
    own_group_consumer,
    progress,
    put_location,
    raw_round_trip_rate,
    run_on_stack,
    send_args,
    until_assigned,
)
from omni_devkit.cli import bench_app
from omni_devkit.devstack.process import DevStackError

SERVICES = ("inventory", "order", "loyalty")
STACK_ENV = {"LOYALTY_IN_SAGA": "true", "LOYALTY_PENDING_DAYS": "0"}
POINTS = 100  # redeemed per checkout: 1.00 at the default point value
SKUS = 16
IDLE_S = 60.0


@dataclass(frozen=True)
class LoyaltyResult:
    """One run's figures."""

    entries: int
    ledger_seconds: float
    raw_messages_per_s: float
    checkouts: int
    without_seconds: float
    with_seconds: float
    confirmed_without: int
    confirmed_with: int

    def as_json(self) -> dict[str, Any]:
        """The figures as one JSON object."""
        without = self.checkouts / self.without_seconds if self.without_seconds else 0.0
        with_ = self.checkouts / self.with_seconds if self.with_seconds else 0.0
        return {
            "entries": self.entries,
            "ledger_entries_per_s": round(self.entries / self.ledger_seconds, 1),
            "raw_messages_per_s": round(self.raw_messages_per_s, 1),
            "checkouts": self.checkouts,
            "checkouts_per_s_without_loyalty": round(without, 1),
            "checkouts_per_s_with_loyalty": round(with_, 1),
            "confirmed_without_loyalty": self.confirmed_without,
            "confirmed_with_loyalty": self.confirmed_with,
            "saga_cost_ratio": round(with_ / without, 2) if without else 0.0,
        }


async def _send_all(producer: AIOKafkaProducer, events: Iterable[Event], prefix: str) -> None:
    sends = [await producer.send(**send_args(e, prefix)) for e in events]
    await asyncio.gather(*sends)


def _sale(customer: str, euros: str) -> OrderPlaced:
    """An in-store sale as order publishes it: an order born completed."""
    return OrderPlaced(
        order_id=f"ord_{uuid.uuid4().hex}",
        customer_id=customer,
        channel="store",
        status="completed",
        lines=[{"sku": "BENCH-TILL", "qty": 1, "unit_price": {"amount": euros, "currency": "EUR"}}],
        fulfillment={"type": "pickup", "location_id": "bench-store"},
    )


def _checkout(customer: str, sku: str, warehouse: str, points: int | None) -> CheckoutSubmitted:
    return CheckoutSubmitted(
        checkout_id=f"chk-{uuid.uuid4().hex}",
        customer_id=customer,
        channel="web",
        lines=[{"sku": sku, "qty": 1, "unit_price": {"amount": "10.00", "currency": "EUR"}}],
        fulfillment={"type": "pickup", "location_id": warehouse},
        payment={
            "reference": f"pay-{customer}",
            "authorized": {"amount": "10.00", "currency": "EUR"},
        },
        points_to_redeem=points,
    )


async def _collect(
    consumer: AIOKafkaConsumer,
    wanted: int,
    keep: Callable[[str, dict[str, Any]], str | None],
    say: Callable[[str], None],
    what: str,
) -> dict[str, str]:
    """Read until ``keep(ce_type, data)`` named ``wanted`` distinct things (id -> outcome)."""
    found: dict[str, str] = {}
    idle_since = last_progress = time.perf_counter()
    while len(found) < wanted:
        batches = await consumer.getmany(timeout_ms=500, max_records=5000)
        now = time.perf_counter()
        if not batches and now - idle_since > IDLE_S:
            raise DevStackError(f"{what}: only {len(found)} of {wanted}, none for {IDLE_S:g} s")
        for records in batches.values():
            for record in records:
                ce_type = dict(record.headers).get("ce_type", b"").decode()
                data = json.loads(record.value)
                key = keep(ce_type, data)
                if key is not None and key not in found:
                    found[key] = ce_type
                    idle_since = now
        if now - last_progress > 2:
            say(f"  {what}: {len(found)}/{wanted} ...")
            last_progress = now
    return found


async def _stock(
    target: StackTarget,
    producer: AIOKafkaProducer,
    warehouse: str,
    skus: list[str],
    units: int,
    transport: httpx.AsyncBaseTransport | None,
) -> None:
    async with httpx.AsyncClient(
        base_url=target.url("inventory"),
        headers={"Authorization": f"Bearer {target.api_key}"},
        timeout=10,
        transport=transport,
    ) as http:
        await put_location(
            http, warehouse, {"name": "Bench warehouse", "kind": "warehouse", "offers_pickup": True}
        )
        await _send_all(
            producer,
            (
                StockAdjusted(
                    adjustment_id=uuid.uuid4().hex,
                    location_id=warehouse,
                    sku=sku,
                    kind="receipt",
                    delta=units,
                    occurred_at=datetime.now(UTC),
                )
                for sku in skus
            ),
            target.topic_prefix,
        )
        deadline = time.monotonic() + 60
        for sku in skus:  # stocked when inventory says so
            while True:
                answer = await http.get(f"/availability/{sku}")
                rows = answer.json().get("locations", []) if answer.status_code == 200 else []
                if any(r["location_id"] == warehouse and r["on_hand"] >= units for r in rows):
                    break
                if time.monotonic() > deadline:
                    raise DevStackError(f"inventory did not stock {sku} within 60 s")
                await asyncio.sleep(0.1)


async def measure(
    target: StackTarget,
    *,
    entries: int,
    checkouts: int,
    say: Callable[[str], None],
    inventory_transport: httpx.AsyncBaseTransport | None = None,
) -> LoyaltyResult:
    """Both measurements and the raw broker rate beside them."""
    run = uuid.uuid4().hex[:8]
    prefix = target.topic_prefix
    say(f"raw: {entries} messages through the broker ...")
    raw = await raw_round_trip_rate(target.bootstrap, prefix + "bench.raw.loyalty", run, entries)
    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, linger_ms=5)
    await producer.start()
    try:
        async with (
            own_group_consumer(
                target.bootstrap, prefix + LOYALTY_LEDGER, f"bench-{run}-ledger"
            ) as ledger,
            own_group_consumer(
                target.bootstrap, prefix + ORDER_LIFECYCLE, f"bench-{run}-web"
            ) as lifecycle,
        ):
            await until_assigned([ledger, lifecycle])

            # -- ledger entries per second ----------------------------------------------------
            shoppers = [f"bench-{run}-s{i}" for i in range(max(1, entries // 10))]
            sales = [_sale(shoppers[i % len(shoppers)], "12.00") for i in range(entries)]
            ids = {s.order_id for s in sales}
            say(f"ledger: {entries} in-store sales on order.lifecycle.v1 ...")
            started = time.perf_counter()
            await _send_all(producer, sales, prefix)
            await _collect(
                ledger,
                entries,
                lambda t, d: (
                    d["order_id"]
                    if t == "loyalty.points.pending" and d.get("order_id") in ids
                    else None
                ),
                say,
                "ledger entries",
            )
            ledger_s = time.perf_counter() - started

            # -- checkouts without and with points ----------------------------------------------
            sku_ids = [f"BENCH-{run}-{i:02d}" for i in range(SKUS)]
            warehouse = f"bench-{run}-wh"
            units = 2 * checkouts // SKUS + 2  # enough for both phases: no stock refusal
            say(f"stocking {SKUS} SKUs x {units} units, funding {checkouts} shoppers ...")
            await _stock(target, producer, warehouse, sku_ids, units, inventory_transport)
            spenders = [f"bench-{run}-p{i}" for i in range(checkouts)]
            funded = set(spenders)
            await _send_all(producer, (_sale(c, f"{POINTS}.00") for c in spenders), prefix)
            await _collect(
                ledger,
                checkouts,
                lambda t, d: (
                    d["customer_id"]
                    if t == "loyalty.points.available" and d["customer_id"] in funded
                    else None
                ),
                say,
                "funded shoppers (needs LOYALTY_PENDING_DAYS=0)",
            )
            phases: dict[str, tuple[float, int]] = {}
            for phase, customers, points in (
                ("without", [f"bench-{run}-n{i}" for i in range(checkouts)], None),
                ("with", spenders, POINTS),
            ):
                say(f"checkouts {phase} points: {checkouts} at once ...")
                mine = set(customers)
                awaiting: set[str] = set()

                def outcome(
                    t: str, d: dict[str, Any], mine: set[str] = mine, awaiting: set[str] = awaiting
                ) -> str | None:
                    if d.get("customer_id") not in mine:
                        return None
                    if t == "order.placed" and "loyalty" in (d.get("awaiting") or []):
                        awaiting.add(d["order_id"])
                    return d["order_id"] if t in ("order.confirmed", "order.rejected") else None

                started = time.perf_counter()
                await _send_all(
                    producer,
                    (
                        _checkout(c, sku_ids[i % SKUS], warehouse, points)
                        for i, c in enumerate(customers)
                    ),
                    prefix,
                )
                outcomes = await _collect(lifecycle, checkouts, outcome, say, "outcomes")
                seconds = time.perf_counter() - started
                confirmed = sum(1 for t in outcomes.values() if t == "order.confirmed")
                if points and len(awaiting) < checkouts:
                    raise DevStackError(
                        "loyalty is not in the saga: run order with LOYALTY_IN_SAGA=true"
                    )
                phases[phase] = (seconds, confirmed)
    finally:
        await producer.stop()
    return LoyaltyResult(
        entries=entries,
        ledger_seconds=ledger_s,
        raw_messages_per_s=raw,
        checkouts=checkouts,
        without_seconds=phases["without"][0],
        with_seconds=phases["with"][0],
        confirmed_without=phases["without"][1],
        confirmed_with=phases["with"][1],
    )


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set env vars for a private stack's processes (they inherit them), then restore."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@bench_app.command("loyalty")
def loyalty(
    entries: Annotated[int, typer.Option(min=10, help="Sales for the ledger figure")] = 2000,
    checkouts: Annotated[int, typer.Option(min=10, help="Checkouts per phase")] = 500,
    embedded: Annotated[
        bool, typer.Option("--embedded", help="Start a private broker, database and services")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line")] = False,
) -> None:
    """Ledger entries/s from order.lifecycle.v1; checkouts/s with loyalty in the saga against
    without it; the raw broker rate beside them."""

    say = progress(as_json)

    with _environment(STACK_ENV):
        result = run_on_stack(
            SERVICES,
            lambda target: measure(target, entries=entries, checkouts=checkouts, say=say),
            embedded=embedded,
            say=say,
        )
    figures = result.as_json()
    if as_json:
        typer.echo(json.dumps(figures))
        return
    typer.echo(
        f"ledger: {figures['ledger_entries_per_s']} entries/s applied from order.lifecycle.v1"
        f" ({figures['entries']} sales); raw broker {figures['raw_messages_per_s']} msgs/s"
    )
    typer.echo(
        f"checkouts: {figures['checkouts_per_s_with_loyalty']}/s redeeming points (loyalty in"
        f" the saga) vs {figures['checkouts_per_s_without_loyalty']}/s without"
        f" (ratio {figures['saga_cost_ratio']}); confirmed {figures['confirmed_with_loyalty']}"
        f" and {figures['confirmed_without_loyalty']} of {figures['checkouts']}"
    )
