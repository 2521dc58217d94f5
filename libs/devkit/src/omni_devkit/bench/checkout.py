"""``omni bench checkout``: how many checkouts per second the saga confirms, never overselling.

Stocks a bench warehouse, then publishes N delivery checkouts at once on
``checkout.submitted.v1`` and waits, on ``order.lifecycle.v1`` in a consumer group of its
own, for each order's outcome (``order.confirmed`` or ``order.rejected``). The demand is
larger than the stock on purpose, so the run also proves that no SKU is oversold: exactly the
stocked units are confirmed, the rest rejected. In the same run it measures the raw broker:
N messages produced and consumed through one topic, with no service work.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import typer
from aiokafka import AIOKafkaProducer
from omni_contracts import (
    ORDER_LIFECYCLE,
    CheckoutSubmitted,
    StockAdjusted,
)

from omni_devkit.bench.broker import BrokerMeter
from omni_devkit.bench.floor import Floor, WorkRecorder, consumers_per_topic, replay
from omni_devkit.bench.kit import (
    CpuMeter,
    StackTarget,
    own_group_consumer,
    progress,
    put_location,
    raw_round_trip_rate,
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
RAW_TOPIC = "bench.raw.checkout"


@dataclass(frozen=True)
class CheckoutResult:
    """One run's figures."""

    checkouts: int
    confirmed: int
    rejected: int
    seconds: float
    stocked_units: int
    oversold_skus: int
    raw_messages_per_s: float
    # CPU ms per checkout by process, from the first checkout sent until the whole stack had
    # handled everything it caused (empty when the stack's processes are unknown).
    cpu_ms: dict[str, float] = field(default_factory=dict)
    floor: Floor | None = None
    work: dict[str, Any] = field(default_factory=dict)
    # The broker's own counters over the same window: requests per checkout by kind, and
    # the record bytes sent to consumers over those they had to fetch (1.0: none twice).
    broker_requests: dict[str, float] = field(default_factory=dict)
    fetched_vs_needed: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The figures as one JSON object."""
        rate = self.checkouts / self.seconds if self.seconds else 0.0
        figures: dict[str, Any] = {
            "checkouts": self.checkouts,
            "confirmed": self.confirmed,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 2),
            "checkouts_per_s": round(rate, 1),
            "stocked_units": self.stocked_units,
            "oversold_skus": self.oversold_skus,
            "raw_messages_per_s": round(self.raw_messages_per_s, 1),
        }
        if self.cpu_ms:
            figures["cpu_ms_per_checkout"] = self.cpu_ms
        if self.floor is not None:
            figures["floor_cpu_ms_per_checkout"] = self.floor.as_json()
            figures["cpu_vs_floor"] = round(self.cpu_ms["total"] / self.floor.total_ms, 2)
        if self.work:
            figures["work_per_checkout"] = self.work
        if self.broker_requests:
            figures["broker_requests_per_checkout"] = self.broker_requests
        if self.fetched_vs_needed is not None:
            figures["broker_fetched_vs_needed"] = self.fetched_vs_needed
        return figures


async def _stock(
    target: StackTarget, producer: AIOKafkaProducer, warehouse: str, skus: list[str], units: int
) -> None:
    async with httpx.AsyncClient(
        base_url=target.url("inventory"),
        headers={"Authorization": f"Bearer {target.api_key}"},
        timeout=10,
    ) as http:
        await put_location(
            http,
            warehouse,
            {
                "name": "Bench warehouse",
                "kind": "warehouse",
                "ships_online": True,
                "offers_pickup": False,
            },
        )
        for sku in skus:
            receipt = StockAdjusted(
                adjustment_id=uuid.uuid4().hex,
                location_id=warehouse,
                sku=sku,
                kind="receipt",
                delta=units,
                occurred_at=datetime.now(UTC),
            )
            await producer.send(**send_args(receipt, target.topic_prefix))
        await producer.flush()
        deadline = time.monotonic() + 60
        for sku in skus:  # stocked when inventory says so
            while True:
                answer = await http.get(f"/availability/{sku}")
                if answer.status_code == 200 and answer.json().get("online_available") == units:
                    break
                if time.monotonic() > deadline:
                    raise DevStackError(f"inventory did not stock {sku} within 60 s")
                await asyncio.sleep(0.1)


async def measure(
    target: StackTarget, *, checkouts: int, skus: int, say: Any, floor: bool = True
) -> CheckoutResult:
    """Stock, publish ``checkouts`` at once, count the outcomes; the raw rate beside it, and
    (when the stack's processes are known) the CPU per checkout of each and the floor."""
    run = uuid.uuid4().hex[:8]
    say(f"raw: {checkouts} messages through the broker ...")
    raw = await raw_round_trip_rate(
        target.bootstrap, target.topic_prefix + RAW_TOPIC, run, checkouts
    )
    sku_ids = [f"BENCH-{run}-{i:03d}" for i in range(skus)]
    # 10 % more demand than stock: the saga must refuse exactly the surplus.
    units = max(1, int(checkouts / skus / 1.1))
    warehouse = f"bench-{run}-wh"
    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, linger_ms=5)
    await producer.start()
    try:
        say(f"stocking {skus} SKUs x {units} units ...")
        await _stock(target, producer, warehouse, sku_ids, units)
        lifecycle = target.topic_prefix + ORDER_LIFECYCLE
        async with own_group_consumer(target.bootstrap, lifecycle, f"bench-{run}-web") as web:
            await until_assigned([web])
            prefix = f"bench-{run}-c"
            bodies = [
                CheckoutSubmitted.model_validate(
                    {
                        "checkout_id": f"{prefix}{n}",
                        "customer_id": f"{prefix}{n}",
                        "channel": "web",
                        "lines": [
                            {
                                "sku": sku_ids[n % skus],
                                "qty": 1,
                                "unit_price": {"amount": "10.00", "currency": "EUR"},
                            }
                        ],
                        "fulfillment": {
                            "type": "delivery",
                            "address": {
                                "line1": "1 Bench Street",
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
                for n in range(checkouts)
            ]
            services = [k for k in target.pids if k not in ("kafka", "postgres")]
            # The broker's counters are read outside the CPU window (attaching costs its JVM).
            broker = BrokerMeter(target.pids.get("kafka")).start()
            meter = CpuMeter(target.pids).start() if target.pids else None
            recorder = None
            if floor and target.pids and target.database_url:
                recorder = WorkRecorder(target, consumers_per_topic(target))
                await recorder.start()
            say(f"checkout: publishing {checkouts} checkouts at once ...")
            started = time.perf_counter()
            sends = [await producer.send(**send_args(b, target.topic_prefix)) for b in bodies]
            await asyncio.gather(*sends)
            outcomes: dict[str, str] = {}
            sku_of: dict[str, str] = {}
            last_progress = started
            idle_since = time.perf_counter()
            while len(outcomes) < checkouts:
                batches = await web.getmany(timeout_ms=500, max_records=5000)
                now = time.perf_counter()
                if not batches and now - idle_since > 60:
                    raise DevStackError(
                        f"checkout: only {len(outcomes)} of {checkouts} outcomes, none for 60 s"
                    )
                for records in batches.values():
                    for record in records:
                        ce_type = dict(record.headers).get("ce_type", b"").decode()
                        if ce_type not in ("order.confirmed", "order.rejected"):
                            continue
                        data = json.loads(record.value)
                        customer = data.get("customer_id") or ""
                        if customer.startswith(prefix):
                            outcomes[customer] = ce_type
                            idle_since = now
                if now - last_progress > 2:
                    say(f"  {len(outcomes)}/{checkouts} outcomes ...")
                    last_progress = now
            seconds = time.perf_counter() - started
            for n, body in enumerate(bodies):
                sku_of[body.customer_id] = sku_ids[n % skus]
            cpu: dict[str, float] = {}
            floor_figures, work_figures = None, {}
            if meter is not None:
                say("checkout: waiting until every service has handled what they caused ...")
                groups = [f"{target.topic_prefix}{s}.main" for s in services]
                await until_drained(target.bootstrap, groups)
                meter.stop()
                cpu = meter.per_unit_ms(checkouts)
            broker.stop()
            if broker.why_not:
                say(f"checkout: no broker request counts ({broker.why_not})")
            readers = consumers_per_topic(target)
            readers[lifecycle] = readers.get(lifecycle, 0) + 1  # this bench's own consumer
            if recorder is not None:
                work = await recorder.stop(checkouts, say)
                work_figures = work.as_json()
                floor_figures = await replay(target, work, say)
    finally:
        await producer.stop()
    confirmed = Counter(sku_of[c] for c, t in outcomes.items() if t == "order.confirmed")
    return CheckoutResult(
        checkouts=checkouts,
        confirmed=sum(confirmed.values()),
        rejected=sum(1 for t in outcomes.values() if t == "order.rejected"),
        seconds=seconds,
        stocked_units=units * skus,
        oversold_skus=sum(1 for n in confirmed.values() if n > units),
        raw_messages_per_s=raw,
        cpu_ms=cpu,
        floor=floor_figures,
        work=work_figures,
        broker_requests=broker.requests_per_unit(checkouts),
        fetched_vs_needed=broker.fetched_vs_needed(readers),
    )


@bench_app.command("checkout")
def checkout(
    checkouts: Annotated[int, typer.Option(min=1, help="Checkouts published at once")] = 3000,
    skus: Annotated[int, typer.Option(min=1, help="SKUs the checkouts spread over")] = 50,
    embedded: Annotated[
        bool, typer.Option("--embedded", help="Start a private broker, database and services")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line")] = False,
) -> None:
    """Placed -> confirmed for N checkouts through the stack, 0 oversold, against the raw
    broker rate; the CPU per checkout of each process and the floor (the same work without
    the platform) in the same run. Targets: >= 400 checkouts/s, CPU <= 3x the floor."""

    say = progress(as_json)

    result = run_on_stack(
        SERVICES,
        lambda target: measure(target, checkouts=checkouts, skus=skus, say=say),
        embedded=embedded,
        say=say,
    )
    figures = result.as_json()
    if as_json:
        typer.echo(json.dumps(figures))
    else:
        typer.echo(
            f"checkout: {figures['checkouts']} checkouts -> {figures['confirmed']} confirmed, "
            f"{figures['rejected']} rejected in {figures['seconds']} s = "
            f"{figures['checkouts_per_s']} checkouts/s (target >= 400); raw broker "
            f"{figures['raw_messages_per_s']} msgs/s; stocked {figures['stocked_units']} units, "
            f"oversold SKUs: {figures['oversold_skus']}"
        )
        if cpu := figures.get("cpu_ms_per_checkout"):
            parts = ", ".join(f"{k} {v}" for k, v in cpu.items() if k != "total")
            typer.echo(f"  CPU per checkout: {cpu['total']} ms ({parts})")
        if floor := figures.get("floor_cpu_ms_per_checkout"):
            typer.echo(
                f"  floor: {floor['total']} ms (broker {floor['kafka']}, PostgreSQL"
                f" {floor['postgres']}, clients {floor['client']}); the stack spends"
                f" {figures['cpu_vs_floor']}x the floor (target <= 3x);"
                f" work per checkout: {figures['work_per_checkout']}"
            )
        if requests := figures.get("broker_requests_per_checkout"):
            typer.echo(
                f"  broker requests per checkout: {requests}; record bytes fetched"
                f" {figures.get('broker_fetched_vs_needed')}x those needed"
            )
    if result.oversold_skus or result.confirmed > result.stocked_units:
        fail(f"oversold: {result.oversold_skus} SKUs confirmed beyond their stock")
