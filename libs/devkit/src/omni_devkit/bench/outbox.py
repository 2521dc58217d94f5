"""``omni bench outbox``: what the transactional outbox costs against publishing directly.

Two figures, each next to a baseline measured in the same run on the same broker:

- throughput: rows drained by the relay per second vs. direct pipelined publishes per second;
- latency: commit-of-the-state-change -> consumer receives, vs. publish -> consumer receives.

Uses ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` when both are set, else starts an
embedded Tansu and PostgreSQL of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import typer
from aiokafka import AIOKafkaConsumer, TopicPartition
from omni_common.outbox import OutboxMessage
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_common.topics import create_topics
from omni_contracts import AvailabilityChanged
from omni_contracts.envelope import new_envelope

from omni_devkit.bench.kit import infrastructure
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError

TOPIC = "inventory.availability.v1"


def _event(seq: int) -> AvailabilityChanged:
    return AvailabilityChanged(
        sku=f"SKU-{seq % 64}",
        location_id="bench",
        on_hand=seq,
        reserved=0,
        available=seq,
        status="in_stock",
        previous_status="in_stock",
        online_available=seq,
        cause="adjustment",
        changed_at=datetime.now(UTC),
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.asynccontextmanager
async def _reader(bootstrap: str, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        while not partitions:
            await asyncio.sleep(0.05)
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        assigned = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assigned)
        await consumer.seek_to_end(*assigned)
        yield consumer
    finally:
        await consumer.stop()


async def _until_received(consumer: AIOKafkaConsumer, ce_id: str) -> float:
    while True:
        batch = await consumer.getmany(timeout_ms=1000)
        for records in batch.values():
            for record in records:
                if dict(record.headers).get("ce_id", b"").decode() == ce_id:
                    return time.perf_counter()


async def _measure(bootstrap: str, database: str, events: int, samples: int) -> dict[str, Any]:
    from omni_devkit.devstack.postgres import create_database

    run = uuid.uuid4().hex[:8]
    prefix = f"bench{run}."
    await create_topics(bootstrap, prefix=prefix, names=[TOPIC])
    settings = ServiceSettings(
        service_name="bench",
        kafka_bootstrap_servers=bootstrap,
        database_url=await create_database(database, f"bench{run}"),
        topic_prefix=prefix,
    )
    runtime = ServiceRuntime(settings)
    await runtime.start()
    await runtime.relay.stop()
    publish = runtime.kafka.publish_outbox_message
    topic = settings.topic(TOPIC)
    try:
        # Throughput baseline: the same producer, pipelined, no database.
        typer.echo(f"throughput: publishing {events} events directly ...", err=True)
        started = time.perf_counter()
        for chunk in range(0, events, 500):
            pending = []
            for seq in range(chunk, min(chunk + 500, events)):
                event = _event(seq)
                envelope = new_envelope(event, source="/bench")
                message = OutboxMessage(
                    0,
                    TOPIC,
                    event.partition_key(),
                    envelope.headers(),
                    event.model_dump_json().encode(),
                )
                pending.append(await publish(message))
            await asyncio.gather(*pending)
        raw_rate = events / (time.perf_counter() - started)

        typer.echo(f"throughput: committing {events} events to the outbox ...", err=True)
        for chunk in range(0, events, 500):
            async with runtime.transaction() as tx:
                for seq in range(chunk, min(chunk + 500, events)):
                    await tx.emit(_event(seq))
        typer.echo("throughput: draining the outbox through the relay ...", err=True)
        started = time.perf_counter()
        await runtime.relay.start()
        unpublished = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        while await runtime.pool.fetchval(unpublished):  # noqa: ASYNC110 (polls the database)
            await asyncio.sleep(0.01)
        outbox_rate = events / (time.perf_counter() - started)

        typer.echo(f"latency: {samples} single events, direct and through the outbox ...", err=True)
        raw_ms: list[float] = []
        outbox_ms: list[float] = []
        async with _reader(bootstrap, topic) as consumer:
            for seq in range(samples):
                event = _event(seq)
                envelope = new_envelope(event, source="/bench")
                message = OutboxMessage(
                    0,
                    TOPIC,
                    event.partition_key(),
                    envelope.headers(),
                    event.model_dump_json().encode(),
                )
                sent = time.perf_counter()
                await (await publish(message))
                raw_ms.append((await _until_received(consumer, envelope.id) - sent) * 1000)

                async with runtime.transaction() as tx:
                    written = await tx.emit(_event(seq))
                committed = time.perf_counter()
                outbox_ms.append((await _until_received(consumer, written.id) - committed) * 1000)
    finally:
        await runtime.stop()
    return {
        "events": events,
        "raw_events_per_s": round(raw_rate),
        "outbox_events_per_s": round(outbox_rate),
        "throughput_ratio": round(outbox_rate / raw_rate, 2),
        "samples": samples,
        "raw_p50_ms": round(statistics.median(raw_ms), 2),
        "raw_p99_ms": round(_pct(raw_ms, 0.99), 2),
        "outbox_p50_ms": round(statistics.median(outbox_ms), 2),
        "outbox_p99_ms": round(_pct(outbox_ms, 0.99), 2),
    }


def _progress(line: str) -> None:  # on stderr: --json keeps stdout to its one line
    typer.echo(line, err=True)


@bench_app.command("outbox")
def bench_outbox(
    events: int = typer.Option(20_000, min=100, help="events for the throughput figures"),
    samples: int = typer.Option(300, min=10, help="single events for the latency figures"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON line"),
) -> None:
    """Outbox relay throughput and commit-to-consumer latency vs. publishing directly."""
    try:
        with infrastructure(_progress, name="outbox", durable=True) as (bootstrap, database):
            result = asyncio.run(_measure(bootstrap, database, events, samples))
    except (DevStackError, OSError) as exc:
        fail(f"bench outbox: {exc}")
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(
        f"outbox relay: {result['outbox_events_per_s']} events/s vs direct publish"
        f" {result['raw_events_per_s']} events/s (ratio {result['throughput_ratio']})"
    )
    typer.echo(
        f"commit -> consumer: p50 {result['outbox_p50_ms']} ms, p99 {result['outbox_p99_ms']} ms;"
        f" publish -> consumer: p50 {result['raw_p50_ms']} ms, p99 {result['raw_p99_ms']} ms"
    )
