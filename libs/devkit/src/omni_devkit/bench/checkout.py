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
from dataclasses import dataclass
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
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError

SERVICES = ("inventory", "order")
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

    def as_json(self) -> dict[str, Any]:
        """The figures as one JSON object."""
        rate = self.checkouts / self.seconds if self.seconds else 0.0
        return {
            "checkouts": self.checkouts,
            "confirmed": self.confirmed,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 2),
            "checkouts_per_s": round(rate, 1),
            "stocked_units": self.stocked_units,
            "oversold_skus": self.oversold_skus,
            "raw_messages_per_s": round(self.raw_messages_per_s, 1),
        }


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


async def measure(target: StackTarget, *, checkouts: int, skus: int, say: Any) -> CheckoutResult:
    """Stock, publish ``checkouts`` at once, count the outcomes; the raw rate beside it."""
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
    """Placed -> confirmed for N checkouts through order + inventory, 0 oversold, against the
    raw broker rate; target >= 1,000 checkouts/s."""

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
            f"{figures['checkouts_per_s']} checkouts/s (target >= 1,000); raw broker "
            f"{figures['raw_messages_per_s']} msgs/s; stocked {figures['stocked_units']} units, "
            f"oversold SKUs: {figures['oversold_skus']}"
        )
    if result.oversold_skus or result.confirmed > result.stocked_units:
        fail(f"oversold: {result.oversold_skus} SKUs confirmed beyond their stock")
