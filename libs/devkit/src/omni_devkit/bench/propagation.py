"""``omni bench propagation``: how fast a till sale reaches web and app.

Publishes store sales at a steady rate and measures, per sale, the time from the POS publish
until a consumer in its own group (as the web site or app would be) receives the matching
``inventory.availability.changed`` (matched by its ``causation_id``). In the same run it
measures the bare broker: publish -> consume -> publish -> consume, with no service work,
at the same rate, so the service's cost can be told from the broker's.

Registered on ``omni bench`` through the ``omni.bench`` entry point group (importing this
module adds the command to ``omni_devkit.cli.bench_app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from omni_contracts import (
    INVENTORY_ADJUSTMENTS,
    INVENTORY_AVAILABILITY,
    STORE_SALES,
    Event,
    Line,
    Money,
    SaleRecorded,
    StockAdjusted,
)
from omni_contracts.envelope import encode, header_map, new_envelope

from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError

# Consumers that stand for web and app: answer an empty fetch after 5 ms, not 500.
FETCH_MAX_WAIT_MS = 5
RAW_TOPICS = ("bench.raw.hop1", "bench.raw.hop2")
STOCK_PER_ROW = 1_000_000  # enough that no bench row ever sells out (no change -> no event)


@dataclass(frozen=True)
class Target:
    """Where the stack under test answers."""

    bootstrap: str
    inventory_url: str
    api_key: str
    topic_prefix: str = ""
    # Talk to an in-process app instead of over TCP (tests).
    http_transport: httpx.AsyncBaseTransport | None = None


@dataclass(frozen=True)
class Latencies:
    """Publish-to-receive latencies of one phase, in milliseconds."""

    samples: list[float]
    sent: int

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (nearest rank), or NaN without samples."""
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index]


@dataclass(frozen=True)
class PropagationResult:
    """The figures ``--json`` prints."""

    rate: float
    service: Latencies
    raw: Latencies

    def as_json(self) -> dict[str, Any]:
        """The one-line JSON document of the issue."""
        return {
            "rate": self.rate,
            "events": len(self.service.samples),
            "p50_ms": round(self.service.percentile(0.50), 2),
            "p99_ms": round(self.service.percentile(0.99), 2),
            "raw_p50_ms": round(self.raw.percentile(0.50), 2),
            "raw_p99_ms": round(self.raw.percentile(0.99), 2),
        }


# -- plumbing ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _own_group_consumer(
    target: Target, topic: str, group: str
) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer in its own group, positioned at the end of ``topic`` once assigned."""
    consumer = AIOKafkaConsumer(
        target.topic_prefix + topic,
        bootstrap_servers=target.bootstrap,
        group_id=group,
        auto_offset_reset="latest",
        enable_auto_commit=True,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _until_assigned(consumers: list[AIOKafkaConsumer], timeout: float = 60.0) -> None:  # noqa: ASYNC109
    """Wait until every consumer owns its partitions and knows its positions."""
    deadline = time.monotonic() + timeout
    for consumer in consumers:
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise DevStackError("bench consumers were not assigned partitions in time")
            await consumer.getmany(timeout_ms=100)
        for tp in consumer.assignment():
            await consumer.position(tp)


def _headers(event: Event) -> tuple[str, list[tuple[str, bytes]]]:
    envelope = new_envelope(event, source="/channels/bench")
    return envelope.id, [(k, v.encode()) for k, v in envelope.headers().items()]


async def _paced(rate: float, count: int) -> AsyncIterator[int]:
    """Yield 0..count-1 at ``rate`` per second on a fixed schedule (no drift)."""
    start = time.perf_counter()
    for n in range(count):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield n


class Inflight:
    """Messages published and not yet seen by the measuring consumer."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.unmeasured: set[str] = set()
        self.samples: list[float] = []
        self._empty = asyncio.Event()
        self._empty.set()

    def published(self, ident: str, *, measured: bool = True) -> None:
        """Note that ``ident`` was published just now."""
        if not measured:
            self.unmeasured.add(ident)
        self._empty.clear()
        self.sent[ident] = time.perf_counter()

    def received(self, ident: str, at: float) -> None:
        """Note that ``ident`` arrived at ``at`` (perf_counter seconds)."""
        published = self.sent.pop(ident, None)
        if published is not None and ident not in self.unmeasured:
            self.samples.append((at - published) * 1000)
        if not self.sent:
            self._empty.set()

    async def drain(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout``) until everything published has arrived."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout)


async def _collect(
    consumer: AIOKafkaConsumer,
    inflight: Inflight,
    key_of: Callable[[dict[str, str]], str | None],
    done: asyncio.Event,
) -> None:
    """Record ``receive - publish`` for every awaited id until ``done``."""
    while not done.is_set():
        batches = await consumer.getmany(timeout_ms=50)
        now = time.perf_counter()
        for records in batches.values():
            for record in records:
                ident = key_of(header_map(record.headers or ()))
                if ident is not None:
                    inflight.received(ident, now)


# -- the two phases ----------------------------------------------------------------------------


async def _raw_two_hop(
    target: Target, run: str, rate: float, count: int, warmup: int, say: Callable[[str], None]
) -> Latencies:
    """Publish -> echo consumer -> publish -> consumer, with no service work in between."""
    hop1, hop2 = (target.topic_prefix + t for t in RAW_TOPICS)
    admin = AIOKafkaAdminClient(bootstrap_servers=target.bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, 12, 1) for t in (hop1, hop2) if t not in existing]
        if missing:
            with contextlib.suppress(Exception):  # created meanwhile by another bench
                await admin.create_topics(missing)
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, linger_ms=0)
    await producer.start()
    inflight = Inflight()
    done = asyncio.Event()
    try:
        async with (
            _own_group_consumer(target, RAW_TOPICS[0], f"bench-{run}-echo") as echo,
            _own_group_consumer(target, RAW_TOPICS[1], f"bench-{run}-raw") as sink,
        ):
            say("raw: waiting for the consumer groups ...")
            await _until_assigned([echo, sink])

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
                asyncio.create_task(_collect(sink, inflight, lambda h: h.get("bench_id"), done)),
            ]
            say(f"raw: {count} messages at {rate:g}/s ...")
            async for n in _paced(rate, count):
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
    target: Target,
    run: str,
    rate: float,
    count: int,
    warmup: int,
    stores: int,
    skus: int,
    say: Callable[[str], None],
) -> Latencies:
    """POS sale -> inventory -> ``inventory.availability.changed`` -> a web/app consumer."""
    store_ids = [f"bench-{run}-store-{i:02d}" for i in range(stores)]
    sku_ids = [f"BENCH-{run}-{j:03d}" for j in range(skus)]
    now = datetime.now(UTC)
    async with httpx.AsyncClient(
        base_url=target.inventory_url,
        headers={"Authorization": f"Bearer {target.api_key}"},
        timeout=10,
        transport=target.http_transport,
    ) as http:
        for store in store_ids:
            response = await http.put(
                f"/locations/{store}",
                json={
                    "name": f"Bench store {store}",
                    "kind": "store",
                    "ships_online": True,
                    "offers_pickup": False,
                    "low_stock_threshold": 0,
                },
            )
            if response.status_code not in (200, 201):
                raise DevStackError(
                    f"inventory refused PUT /locations/{store}: {response.status_code} "
                    f"{response.text[:200]}"
                )

    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, linger_ms=0)
    await producer.start()
    inflight = Inflight()
    done = asyncio.Event()
    try:
        async with _own_group_consumer(target, INVENTORY_AVAILABILITY, f"bench-{run}-web") as web:
            say("propagation: waiting for the consumer group ...")
            await _until_assigned([web])
            collector = asyncio.create_task(
                _collect(web, inflight, lambda h: h.get("causation_id"), done)
            )

            say(f"propagation: stocking {stores * skus} rows ...")
            for store in store_ids:
                for sku in sku_ids:
                    receipt = StockAdjusted(
                        adjustment_id=uuid.uuid4().hex,
                        location_id=store,
                        sku=sku,
                        kind="receipt",
                        delta=STOCK_PER_ROW,
                        occurred_at=now,
                    )
                    ce_id, headers = _headers(receipt)
                    inflight.published(ce_id, measured=False)
                    await producer.send(
                        target.topic_prefix + INVENTORY_ADJUSTMENTS,
                        encode(receipt),
                        key=receipt.partition_key().encode(),
                        headers=headers,
                    )
            await inflight.drain(timeout=60)
            if inflight.sent:
                raise DevStackError(
                    f"inventory did not tell the availability of {len(inflight.sent)} stocked"
                    " rows within 60 s"
                )

            say(f"propagation: {count} sales at {rate:g}/s ...")
            price = Money(amount=Decimal("9.90"), currency="EUR")
            async for n in _paced(rate, count):
                sale = SaleRecorded(
                    sale_id=f"bench-{run}-{n}",
                    location_id=store_ids[n % stores],
                    lines=[Line(sku=sku_ids[(n // stores) % skus], qty=1, unit_price=price)],
                    occurred_at=datetime.now(UTC),
                )
                ce_id, headers = _headers(sale)
                inflight.published(ce_id, measured=n >= warmup)
                await producer.send(
                    target.topic_prefix + STORE_SALES,
                    encode(sale),
                    key=sale.partition_key().encode(),
                    headers=headers,
                )
            await inflight.drain()
            done.set()
            await collector
    finally:
        await producer.stop()
    return Latencies(inflight.samples, count - warmup)


async def measure(
    target: Target,
    *,
    rate: float,
    duration: float,
    warmup: float,
    stores: int,
    skus: int,
    say: Callable[[str], None],
) -> PropagationResult:
    """Run both phases against ``target`` (raw broker first, then the service)."""
    run = uuid.uuid4().hex[:6]
    count = max(1, round(rate * (duration + warmup)))
    skipped = min(count - 1, round(rate * warmup))
    raw = await _raw_two_hop(target, run, rate, count, skipped, say)
    service = await _propagation(target, run, rate, count, skipped, stores, skus, say)
    return PropagationResult(rate, service, raw)


# -- where to run ------------------------------------------------------------------------------


def _dev_stack_target(state_dir: Path | None) -> Target:
    """The running dev stack, from ``dev.env``; environment variables take precedence."""
    from omni_devkit.devstack.stack import default_state_dir, read_kv_file

    env_file = (state_dir or default_state_dir()) / "dev.env"
    values = read_kv_file(env_file) if env_file.exists() else {}
    values |= {
        k: os.environ[k]
        for k in ("KAFKA_BOOTSTRAP_SERVERS", "INVENTORY_URL", "API_KEY", "TOPIC_PREFIX")
        if os.environ.get(k)
    }
    missing = [
        k for k in ("KAFKA_BOOTSTRAP_SERVERS", "INVENTORY_URL", "API_KEY") if k not in values
    ]
    if missing:
        raise DevStackError(
            f"no dev stack found ({env_file} lacks {', '.join(missing)}): start one with "
            "`omni dev up`, or run with --embedded"
        )
    return Target(
        values["KAFKA_BOOTSTRAP_SERVERS"],
        values["INVENTORY_URL"],
        values["API_KEY"],
        values.get("TOPIC_PREFIX", ""),
    )


def _dev_stack_target_or_none(state_dir: Path | None, say: Callable[[str], None]) -> Target | None:
    """The running dev stack, or None (then the bench starts a private one)."""
    try:
        return _dev_stack_target(state_dir)
    except DevStackError as exc:
        say(f"{exc}; starting a private stack instead")
        return None


@contextlib.contextmanager
def _embedded_stack(say: Callable[[str], None]) -> Iterator[Target]:
    """A private stack (PostgreSQL, Tansu, inventory as its own process) in a temp dir."""
    from omni_devkit.devstack.stack import DevStack, DevStackConfig, read_kv_file

    previous = os.environ.get("OMNI_SERVICES")
    os.environ["OMNI_SERVICES"] = "inventory"
    try:
        with tempfile.TemporaryDirectory(prefix="omni-bench-") as state:
            config = DevStackConfig.with_free_ports(Path(state), services=1, fast_postgres=True)
            stack = DevStack(config, echo=say)
            stack.up()
            try:
                env = read_kv_file(config.env_file)
                yield Target(env["KAFKA_BOOTSTRAP_SERVERS"], env["INVENTORY_URL"], env["API_KEY"])
            finally:
                stack.stop(quiet=True)
    finally:
        if previous is None:
            os.environ.pop("OMNI_SERVICES", None)
        else:
            os.environ["OMNI_SERVICES"] = previous


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

    def say(line: str) -> None:
        if not as_json:
            typer.echo(line)
            sys.stdout.flush()

    def run(target: Target) -> PropagationResult:
        return asyncio.run(
            measure(
                target,
                rate=rate,
                duration=duration,
                warmup=warmup,
                stores=stores,
                skus=skus,
                say=say,
            )
        )

    try:
        target = None if embedded else _dev_stack_target_or_none(state_dir, say)
        if target is None:
            with _embedded_stack(say) as target:
                result = run(target)
        else:
            result = run(target)
    except DevStackError as exc:
        fail(str(exc))
    except (OSError, httpx.HTTPError) as exc:
        fail(f"the stack did not answer: {type(exc).__name__}: {exc}")

    figures = result.as_json()
    lost = result.service.sent - figures["events"]
    if not figures["events"]:
        fail("no availability change arrived for any sale")
    if as_json:
        typer.echo(json.dumps(figures))
    else:
        ratio = figures["p99_ms"] / figures["raw_p99_ms"] if figures["raw_p99_ms"] else float("nan")
        typer.echo(
            f"propagation at {rate:g} sales/s: {figures['events']} measured, "
            f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms; raw two-hop p50 "
            f"{figures['raw_p50_ms']} ms, p99 {figures['raw_p99_ms']} ms "
            f"(p99 {ratio:.2f}x raw; targets: <= 1.5x and < 25 ms)"
        )
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
