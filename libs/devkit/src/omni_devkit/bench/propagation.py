"""``omni bench propagation``: how fast a till sale reaches web and app.

Publishes store sales at a steady rate and measures, per sale, the time from the POS publish
until a consumer in its own group (as the web site or app would be) receives the matching
``inventory.availability.changed`` (matched by its ``causation_id``). In the same run it
measures the bare broker: publish -> consume -> publish -> consume, with no service work,
at the same rate, so the service's cost can be told from the broker's.

Inventory is driven through its API (bench locations) and Kafka (stock receipts, sales).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from aiokafka import AIOKafkaProducer
from omni_contracts import (
    INVENTORY_AVAILABILITY,
    Line,
    Money,
    SaleRecorded,
    StockAdjusted,
)

from omni_devkit.bench.kit import (
    CpuMeter,
    Inflight,
    Latencies,
    StackTarget,
    ce_id,
    ensure_topics,
    own_group_consumer,
    paced,
    progress,
    put_location,
    record_arrivals,
    run_on_stack,
    send_args,
    until_assigned,
    until_drained,
)
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError
from omni_devkit.devstack.stack import DEFAULT_SERVICE_ORDER

# The whole platform, as `make run` runs it: every service pays its share of the work.
SERVICES = DEFAULT_SERVICE_ORDER
RAW_TOPICS = ("bench.raw.hop1", "bench.raw.hop2")
STOCK_PER_ROW = 1_000_000  # enough that no bench row ever sells out (no change -> no event)


@dataclass(frozen=True)
class PropagationResult:
    """The figures ``--json`` prints."""

    rate: float
    service: Latencies
    raw: Latencies
    # CPU ms per sale by process, from the first sale until every service had handled what
    # the sales caused (empty when the stack's processes are unknown).
    cpu_ms: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The one-line JSON document of the issue."""
        figures: dict[str, Any] = {
            "rate": self.rate,
            "events": len(self.service.samples),
            "p50_ms": round(self.service.percentile(0.50), 2),
            "p99_ms": round(self.service.percentile(0.99), 2),
            "raw_p50_ms": round(self.raw.percentile(0.50), 2),
            "raw_p99_ms": round(self.raw.percentile(0.99), 2),
        }
        if self.cpu_ms:
            figures["cpu_ms_per_sale"] = self.cpu_ms
        return figures


async def stock_rows(
    producer: AIOKafkaProducer,
    target: StackTarget,
    inflight: Inflight,
    rows: list[tuple[str, str]],
) -> None:
    """Receive ``STOCK_PER_ROW`` units of each ``(location, sku)`` row and wait (60 s at most)
    until inventory told the availability of every one."""
    for location, sku in rows:
        receipt = StockAdjusted(
            adjustment_id=uuid.uuid4().hex,
            location_id=location,
            sku=sku,
            kind="receipt",
            delta=STOCK_PER_ROW,
            occurred_at=datetime.now(UTC),
        )
        args = send_args(receipt, target.topic_prefix)
        inflight.published(ce_id(args), measured=False)
        await producer.send(**args)
    await inflight.drain(timeout=60)
    if inflight.sent:
        raise DevStackError(
            f"inventory did not tell the availability of {len(inflight.sent)} stocked"
            " rows within 60 s"
        )


def till_sale(run: str, n: int, location: str, sku: str) -> SaleRecorded:
    """The ``n``-th bench sale: one unit of ``sku`` at ``location``."""
    return SaleRecorded(
        sale_id=f"bench-{run}-{n}",
        location_id=location,
        lines=[Line(sku=sku, qty=1, unit_price=Money(amount=Decimal("9.90"), currency="EUR"))],
        occurred_at=datetime.now(UTC),
    )


# -- the two phases ----------------------------------------------------------------------------


async def _raw_two_hop(
    target: StackTarget,
    run: str,
    rate: float,
    count: int,
    warmup: int,
    say: Callable[[str], None],
) -> Latencies:
    """Publish -> echo consumer -> publish -> consumer, with no service work in between."""
    hop1, hop2 = (target.topic_prefix + t for t in RAW_TOPICS)
    await ensure_topics(target.bootstrap, [hop1, hop2])
    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, linger_ms=0)
    await producer.start()
    inflight = Inflight()
    done = asyncio.Event()
    try:
        async with (
            own_group_consumer(target.bootstrap, hop1, f"bench-{run}-echo") as echo,
            own_group_consumer(target.bootstrap, hop2, f"bench-{run}-raw") as sink,
        ):
            say("raw: waiting for the consumer groups ...")
            await until_assigned([echo, sink])

            async def relay() -> None:
                while not done.is_set():
                    batches = await echo.getmany(timeout_ms=50)
                    for records in batches.values():
                        for record in records:
                            await producer.send(
                                hop2, record.value, key=record.key, headers=list(record.headers)
                            )

            tasks = [
                asyncio.create_task(relay()),
                asyncio.create_task(
                    record_arrivals(sink, inflight, lambda h: h.get("bench_id"), done)
                ),
            ]
            say(f"raw: {count} messages at {rate:g}/s ...")
            async for n in paced(rate, count):
                ident = uuid.uuid4().hex
                inflight.published(ident, measured=n >= warmup)
                await producer.send(
                    hop1, b"{}", key=str(n % 12).encode(), headers=[("bench_id", ident.encode())]
                )
            await inflight.drain()
            done.set()
            await asyncio.gather(*tasks)
    finally:
        await producer.stop()
    return Latencies(inflight.samples, count - warmup)


async def _propagation(
    target: StackTarget,
    run: str,
    rate: float,
    count: int,
    warmup: int,
    stores: int,
    skus: int,
    say: Callable[[str], None],
    http_transport: httpx.AsyncBaseTransport | None,
    cpu: dict[str, float],
) -> Latencies:
    """POS sale -> inventory -> ``inventory.availability.changed`` -> a web/app consumer;
    ``cpu`` gets the stack's CPU ms per sale (when its processes are known)."""
    store_ids = [f"bench-{run}-store-{i:02d}" for i in range(stores)]
    sku_ids = [f"BENCH-{run}-{j:03d}" for j in range(skus)]
    async with httpx.AsyncClient(
        base_url=target.url("inventory"),
        headers={"Authorization": f"Bearer {target.api_key}"},
        timeout=10,
        transport=http_transport,
    ) as http:
        for store in store_ids:
            await put_location(
                http,
                store,
                {
                    "name": f"Bench store {store}",
                    "kind": "store",
                    "ships_online": True,
                    "offers_pickup": False,
                    "low_stock_threshold": 0,
                },
            )

    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, linger_ms=0)
    await producer.start()
    inflight = Inflight()
    done = asyncio.Event()
    availability = target.topic_prefix + INVENTORY_AVAILABILITY
    try:
        async with own_group_consumer(target.bootstrap, availability, f"bench-{run}-web") as web:
            say("propagation: waiting for the consumer group ...")
            await until_assigned([web])
            collector = asyncio.create_task(
                record_arrivals(web, inflight, lambda h: h.get("causation_id"), done)
            )
            say(f"propagation: stocking {stores * skus} rows ...")
            await stock_rows(
                producer, target, inflight, [(st, sku) for st in store_ids for sku in sku_ids]
            )
            say(f"propagation: {count} sales at {rate:g}/s ...")
            meter = CpuMeter(target.pids).start() if target.pids else None
            async for n in paced(rate, count):
                sale = till_sale(run, n, store_ids[n % stores], sku_ids[(n // stores) % skus])
                args = send_args(sale, target.topic_prefix)
                inflight.published(ce_id(args), measured=n >= warmup)
                await producer.send(**args)
            await inflight.drain()
            done.set()
            await collector
            if meter is not None:
                say("propagation: waiting until every service has handled what the sales caused")
                services = [k for k in target.pids if k not in ("kafka", "postgres")]
                groups = [f"{target.topic_prefix}{s}.main" for s in services]
                await until_drained(target.bootstrap, groups)
                meter.stop()
                cpu.update(meter.per_unit_ms(count))
    finally:
        await producer.stop()
    return Latencies(inflight.samples, count - warmup)


async def measure(
    target: StackTarget,
    *,
    rate: float,
    duration: float,
    warmup: float,
    stores: int,
    skus: int,
    say: Callable[[str], None],
    http_transport: httpx.AsyncBaseTransport | None = None,
) -> PropagationResult:
    """Run both phases against ``target`` (raw broker first, then the service).

    ``http_transport`` talks to an in-process inventory instead of over TCP (tests).
    """
    run = uuid.uuid4().hex[:6]
    count = max(1, round(rate * (duration + warmup)))
    skipped = min(count - 1, round(rate * warmup))
    raw = await _raw_two_hop(target, run, rate, count, skipped, say)
    cpu: dict[str, float] = {}
    service = await _propagation(
        target, run, rate, count, skipped, stores, skus, say, http_transport, cpu
    )
    return PropagationResult(rate, service, raw, cpu)


@bench_app.command("propagation")
def propagation(
    rate: Annotated[float, typer.Option(min=1, help="Store sales per second")] = 200.0,
    duration: Annotated[float, typer.Option(min=1, help="Seconds measured per phase")] = 10.0,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds sent first, not measured")] = 2.0,
    stores: Annotated[int, typer.Option(min=1, help="Bench stores the sales spread over")] = 8,
    skus: Annotated[int, typer.Option(min=1, help="SKUs per store")] = 32,
    embedded: Annotated[
        bool, typer.Option("--embedded", help="Start a private broker, database and inventory")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line")] = False,
    state_dir: Annotated[
        Path | None, typer.Option(help="Dev stack state dir [default: .omni]")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Write propagation.png and propagation.json (figures) into DIR"),
    ] = None,
) -> None:
    """Store sale -> web/app availability latency, against the raw broker two-hop."""

    say = progress(as_json)

    result = run_on_stack(
        SERVICES,
        lambda target: measure(
            target,
            rate=rate,
            duration=duration,
            warmup=warmup,
            stores=stores,
            skus=skus,
            say=say,
        ),
        embedded=embedded,
        say=say,
        state_dir=state_dir,
    )

    figures = result.as_json()
    lost = result.service.sent - figures["events"]
    if not figures["events"]:
        fail("no availability change arrived for any sale")
    if as_json:
        typer.echo(json.dumps(figures))
    else:
        over = figures["p99_ms"] - figures["raw_p99_ms"]
        typer.echo(
            f"propagation at {rate:g} sales/s: {figures['events']} measured, "
            f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms; raw two-hop p50 "
            f"{figures['raw_p50_ms']} ms, p99 {figures['raw_p99_ms']} ms "
            f"(p99 raw + {over:.1f} ms; targets: <= raw + 8 ms and < 25 ms)"
        )
        if cpu := figures.get("cpu_ms_per_sale"):
            parts = ", ".join(f"{k} {v}" for k, v in cpu.items() if k != "total")
            typer.echo(f"  CPU per sale: {cpu['total']} ms ({parts}; target <= 5 ms)")
    if report is not None:
        from omni_devkit.report import write_report

        png, _ = write_report(
            report,
            "propagation",
            figures,
            {
                "POS sale -> web/app consumer": result.service.samples,
                "raw broker two-hop (baseline)": result.raw.samples,
            },
            title=f"omni bench propagation: {rate:g} sales/s",
        )
        if not as_json:
            typer.echo(f"report: {png} (and propagation.json)")
    if lost:
        typer.echo(f"warning: {lost} sales had no availability change within 10 s", err=True)
