"""``omni bench stream``: a till sale to the browsers, through ``GET /availability/stream``.

Connects ``--clients`` SSE clients (1,000 by default) to inventory's availability stream,
then publishes store sales at a steady rate and measures, for every client and every sale,
the time from the POS publish until that client reads the change (matched by its
``causation_id``). In the same run, a Kafka consumer in its own group (as a channel team's
back end would read ``inventory.availability.v1``) measures the same sales: the figure the
stream is compared against.

The clients are plain asyncio sockets (no HTTP library): one process must hold a thousand
streams on a small machine, and the client's cost must not be what is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

import httpx
import typer
from aiokafka import AIOKafkaProducer
from omni_contracts import INVENTORY_AVAILABILITY

from omni_devkit.bench.kit import (
    Inflight,
    Latencies,
    StackTarget,
    ce_id,
    own_group_consumer,
    paced,
    progress,
    put_location,
    record_arrivals,
    run_on_stack,
    send_args,
    until_assigned,
)
from omni_devkit.bench.propagation import SERVICES, stock_rows, till_sale
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError


@dataclass(frozen=True)
class StreamResult:
    """The figures of one run."""

    rate: float
    clients: int
    connected: int
    stream: Latencies  # one sample per (client, sale)
    kafka: Latencies  # one sample per sale

    def as_json(self) -> dict[str, Any]:
        """The figures ``--json`` prints."""
        return {
            "rate": self.rate,
            "clients": self.clients,
            "connected": self.connected,
            "deliveries": len(self.stream.samples),
            "expected_deliveries": self.stream.sent,
            "p50_ms": round(self.stream.percentile(0.50), 2),
            "p99_ms": round(self.stream.percentile(0.99), 2),
            "kafka_p50_ms": round(self.kafka.percentile(0.50), 2),
            "kafka_p99_ms": round(self.kafka.percentile(0.99), 2),
        }


class SseClients:
    """Many raw SSE connections; every ``data:`` line's ``causation_id`` is timed."""

    def __init__(self, url: str, params: dict[str, Any]) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.request = (
            f"GET /availability/stream?{urlencode(params, doseq=True)} HTTP/1.1\r\n"
            f"Host: {self.host}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        self.sent: dict[str, float] = {}
        self.samples: list[float] = []
        self.ready = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def connect(self, count: int, say: Callable[[str], None]) -> None:
        """Open ``count`` streams and wait until each has its ``ready`` event."""
        for n in range(count):
            self._tasks.append(asyncio.create_task(self._client()))
            if n % 100 == 99:
                await asyncio.sleep(0.05)  # a gentle ramp: the accept queue is finite
        deadline = time.monotonic() + 60
        while self.ready < count and time.monotonic() < deadline:
            failed = [t for t in self._tasks if t.done()]
            if failed and failed[0].exception() is not None:
                raise DevStackError(f"a stream client failed: {failed[0].exception()}")
            await asyncio.sleep(0.1)
        say(f"stream: {self.ready} of {count} clients connected")

    async def _client(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self._writers.append(writer)
        writer.write(self.request)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise DevStackError(f"stream answered {status.decode().strip()}")
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"event: ready"):
                self.ready += 1
            elif line.startswith(b"data: {"):
                now = time.perf_counter()
                ident = json.loads(line[6:]).get("causation_id")
                published = self.sent.get(ident)
                if published is not None:
                    self.samples.append((now - published) * 1000)

    async def close(self) -> None:
        """Close every stream."""
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def measure(
    target: StackTarget,
    *,
    clients: int,
    rate: float,
    duration: float,
    warmup: float,
    skus: int,
    say: Callable[[str], None],
) -> StreamResult:
    """Connect the clients, stock the bench SKUs, publish the sales, time both readers."""
    _raise_fd_limit(clients + 256)
    run = uuid.uuid4().hex[:6]
    store = f"bench-{run}-store"
    sku_ids = [f"BENCH-{run}-S{j:02d}" for j in range(skus)]
    inventory_url = target.url("inventory")
    async with httpx.AsyncClient(
        base_url=inventory_url,
        headers={"Authorization": f"Bearer {target.api_key}"},
        timeout=10,
    ) as http:
        await put_location(
            http, store, {"name": "Stream bench store", "kind": "store", "low_stock_threshold": 0}
        )

    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, linger_ms=0)
    await producer.start()
    sse = SseClients(inventory_url, {"sku": sku_ids})
    kafka = Inflight()
    done = asyncio.Event()
    count = max(1, round(rate * (duration + warmup)))
    skipped = min(count - 1, round(rate * warmup))
    availability = target.topic_prefix + INVENTORY_AVAILABILITY
    try:
        async with own_group_consumer(
            target.bootstrap, availability, f"bench-{run}-backend"
        ) as backend:
            say("stream: waiting for the Kafka consumer group ...")
            await until_assigned([backend])
            collector = asyncio.create_task(
                record_arrivals(backend, kafka, lambda h: h.get("causation_id"), done)
            )
            say(f"stream: stocking {skus} SKUs ...")
            await stock_rows(producer, target, kafka, [(store, sku) for sku in sku_ids])
            say(f"stream: connecting {clients} SSE clients ...")
            await sse.connect(clients, say)
            say(f"stream: {count} sales at {rate:g}/s to {sse.ready} clients ...")
            async for n in paced(rate, count):
                args = send_args(till_sale(run, n, store, sku_ids[n % skus]), target.topic_prefix)
                kafka.published(ce_id(args), measured=n >= skipped)
                if n >= skipped:
                    sse.sent[ce_id(args)] = time.perf_counter()
                await producer.send(**args)
            await kafka.drain()
            expected = (count - skipped) * sse.ready
            deadline = time.monotonic() + 10
            while len(sse.samples) < expected and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            done.set()
            await collector
    finally:
        await sse.close()
        await producer.stop()
    return StreamResult(
        rate,
        clients,
        sse.ready,
        Latencies(sse.samples, (count - skipped) * sse.ready),
        Latencies(kafka.samples, count - skipped),
    )


@bench_app.command("stream")
def stream(
    clients: Annotated[int, typer.Option(min=1, help="SSE clients connected")] = 1000,
    rate: Annotated[float, typer.Option(min=0.1, help="Store sales per second")] = 2.0,
    duration: Annotated[float, typer.Option(min=1, help="Seconds measured")] = 10.0,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds sent first, not measured")] = 1.0,
    skus: Annotated[int, typer.Option(min=1, help="Bench SKUs (every client follows all)")] = 8,
    embedded: Annotated[
        bool, typer.Option("--embedded", help="Start a private broker, database and inventory")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line")] = False,
    state_dir: Annotated[
        Path | None, typer.Option(help="Dev stack state dir [default: .omni]")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Write stream.png and stream.json (figures) into DIR")
    ] = None,
) -> None:
    """Store sale -> SSE clients of /availability/stream, beside a Kafka consumer."""

    say = progress(as_json)

    result = run_on_stack(
        SERVICES,
        lambda target: measure(
            target,
            clients=clients,
            rate=rate,
            duration=duration,
            warmup=warmup,
            skus=skus,
            say=say,
        ),
        embedded=embedded,
        say=say,
        state_dir=state_dir,
    )

    figures = result.as_json()
    if not figures["deliveries"]:
        fail("no availability change reached any stream client")
    if as_json:
        typer.echo(json.dumps(figures))
    else:
        typer.echo(
            f"stream at {rate:g} sales/s to {result.connected} clients: "
            f"{figures['deliveries']}/{figures['expected_deliveries']} deliveries, "
            f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms; Kafka consumer p50 "
            f"{figures['kafka_p50_ms']} ms, p99 {figures['kafka_p99_ms']} ms"
        )
    if report is not None:
        from omni_devkit.report import write_report

        png, _ = write_report(
            report,
            "stream",
            figures,
            {
                f"POS sale -> {result.connected} SSE clients": result.stream.samples,
                "POS sale -> Kafka consumer (same run)": result.kafka.samples,
            },
            title=f"omni bench stream: {rate:g} sales/s, {result.connected} clients",
        )
        if not as_json:
            typer.echo(f"report: {png} (and stream.json)")
    if result.connected < clients:
        fail(f"only {result.connected} of {clients} clients connected")
