"""The foundation's delivery promises, against the real broker and PostgreSQL.

A small stand-in service consumes stock adjustments and tells availability, using exactly
the shared pieces every real service uses (runtime, inbox, outbox, DLQ, retries).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections import defaultdict
from datetime import UTC, datetime

import asyncpg
import pytest
from omni_common.handlers import Lot, Refusal, Subscription
from omni_common.service import ServiceRuntime, Tx
from omni_contracts import (
    AvailabilityChanged,
    StockAdjusted,
)
from omni_devkit.testing.events import ChannelPublisher, ce_headers, record_headers
from opentelemetry import trace

# Also run on Tansu in CI: the zero-install path stays proven.
pytestmark = [pytest.mark.integration, pytest.mark.tansu]

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def adjustment(sku: str = "SKU-1", delta: int = 5, location: str = "store-1") -> StockAdjusted:
    return StockAdjusted(
        adjustment_id=str(uuid.uuid4()),
        location_id=location,
        sku=sku,
        kind="receipt",
        delta=delta,
        occurred_at=NOW,
    )


def availability(sku: str, on_hand: int, location: str = "store-1") -> AvailabilityChanged:
    return AvailabilityChanged(
        sku=sku,
        location_id=location,
        on_hand=on_hand,
        reserved=0,
        available=on_hand,
        status="in_stock" if on_hand else "out_of_stock",
        previous_status="out_of_stock",
        online_available=on_hand,
        cause="adjustment",
        changed_at=NOW,
    )


class StockCounter:
    """A stand-in service: counts adjustments per SKU and tells the new availability."""

    def __init__(self, runtime: ServiceRuntime, fail_first: int = 0) -> None:
        self.runtime = runtime
        self.fail_first = fail_first
        self.calls = 0

    async def on_adjusted(self, adjustments: Lot[StockAdjusted], tx: Tx) -> None:
        for event, envelope in adjustments:
            self.calls += 1
            if self.calls <= self.fail_first:
                raise ConnectionError("database blip")
            if event.sku == "UNKNOWN":
                raise Refusal("unknown_sku", event.sku)
            on_hand = await tx.conn.fetchval(
                "INSERT INTO counted (sku, on_hand) VALUES ($1, $2) ON CONFLICT (sku)"
                " DO UPDATE SET on_hand = counted.on_hand + $2 RETURNING on_hand",
                event.sku,
                event.delta,
            )
            await tx.emit(availability(event.sku, on_hand), caused_by=envelope)


async def start_counter(omni_env, name: str = "counter", fail_first: int = 0) -> StockCounter:
    runtime = ServiceRuntime(omni_env.settings(name))
    counter = StockCounter(runtime, fail_first)
    runtime.subscribe(
        Subscription("inventory.adjustments.v1", {StockAdjusted: counter.on_adjusted})
    )
    runtime.publishes("inventory.availability.v1")
    await runtime.start()
    async with runtime.transaction() as tx:
        await tx.conn.execute(
            "CREATE TABLE IF NOT EXISTS counted (sku text PRIMARY KEY, on_hand int NOT NULL)"
        )
    return counter


async def test_duplicate_delivery_has_one_effect(omni_env) -> None:
    counter = await start_counter(omni_env)
    try:
        reader = omni_env.reader("inventory.availability.v1")
        async with reader, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
            event = adjustment(delta=3)
            ce_id = str(uuid.uuid4())
            await channel.publish(event, ce_id=ce_id)
            await channel.publish(event, ce_id=ce_id)  # redelivered by an at-least-once producer
            await channel.publish(adjustment(delta=1))  # a later, different event
            records = await reader.collect(2, timeout=15)
            assert [json.loads(r.value)["on_hand"] for r in records] == [3, 4]
            assert await reader.collect(1, timeout=1) == []
        on_hand = await counter.runtime.pool.fetchval("SELECT on_hand FROM counted")
        assert on_hand == 4
    finally:
        await counter.runtime.stop()


async def test_malformed_and_invalid_events_go_to_dlq_and_the_next_is_processed(omni_env) -> None:
    counter = await start_counter(omni_env)
    try:
        dlq = omni_env.reader("inventory.adjustments.v1.dlq")
        out = omni_env.reader("inventory.availability.v1")
        async with dlq, out, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
            topic, key = "inventory.adjustments.v1", "SKU-1"
            await channel.publish_raw(
                topic, b"{not json", key=key, headers=ce_headers("inventory.stock.adjusted")
            )
            invalid = {
                "adjustment_id": "a1",
                "location_id": "store-1",
                "sku": "SKU-1",
                "kind": "receipt",
                "delta": "lots",
                "occurred_at": "2026-11-23T10:00:00Z",
            }
            await channel.publish_raw(
                topic,
                json.dumps(invalid).encode(),
                key=key,
                headers=ce_headers("inventory.stock.adjusted"),
            )
            await channel.publish_raw(topic, b"{}", key=key, headers={"content-type": "x"})
            await channel.publish(adjustment(sku="UNKNOWN"))
            await channel.publish(adjustment(delta=7))

            dead = await dlq.collect(4, timeout=15)
            by_reason = {record_headers(r)["dlq_reason"]: r for r in dead}
            assert by_reason.keys() == {
                "malformed_json",
                "schema_violation",
                "invalid_envelope",
                "unknown_sku",
            }
            first = record_headers(by_reason["malformed_json"])
            assert first["dlq_source_topic"] == omni_env.topic(topic)
            assert first["dlq_service"] == "counter"
            assert {"dlq_error", "dlq_source_partition", "dlq_source_offset"} <= first.keys()
            assert "delta" in record_headers(by_reason["schema_violation"])["dlq_error"]
            assert by_reason["malformed_json"].value == b"{not json"  # original bytes, for replay

            (processed,) = await out.collect(1, timeout=15)
            assert json.loads(processed.value)["on_hand"] == 7
    finally:
        await counter.runtime.stop()


async def test_a_ce_id_the_database_would_spell_otherwise_is_dead_lettered_as_such(
    omni_env,
) -> None:
    """Forms of a UUID that Python takes but PostgreSQL refuses or stores otherwise go to the
    DLQ as ``invalid_envelope``; the same id in upper case is the same event (one effect)."""
    counter = await start_counter(omni_env)
    try:
        dlq = omni_env.reader("inventory.adjustments.v1.dlq")
        out = omni_env.reader("inventory.availability.v1")
        async with dlq, out, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
            topic, ce_type = "inventory.adjustments.v1", "inventory.stock.adjusted"
            canonical = str(uuid.uuid4())
            odd = ["{" + canonical + "}", "urn:uuid:" + canonical, canonical.replace("-", "")]
            for ce_id in odd:
                event = adjustment(delta=100)
                await channel.publish_raw(
                    topic,
                    event.model_dump_json().encode(),
                    key=event.sku,
                    headers=ce_headers(ce_type, ce_id=ce_id),
                )
            event = adjustment(delta=2)
            for ce_id in (canonical, canonical.upper()):  # one event, sent twice
                await channel.publish_raw(
                    topic,
                    event.model_dump_json().encode(),
                    key=event.sku,
                    headers=ce_headers(ce_type, ce_id=ce_id),
                )
            await channel.publish(adjustment(delta=3))

            dead = await dlq.collect(len(odd), timeout=15)
            assert sorted(record_headers(r)["ce_id"] for r in dead) == sorted(odd)
            assert {record_headers(r)["dlq_reason"] for r in dead} == {"invalid_envelope"}
            assert all("ce_id" in record_headers(r)["dlq_error"] for r in dead)
            told = await out.collect(2, timeout=15)
            assert [json.loads(r.value)["on_hand"] for r in told] == [2, 5]
            assert await out.collect(1, timeout=1) == []
    finally:
        await counter.runtime.stop()


async def test_transient_failure_is_retried_then_succeeds(omni_env) -> None:
    counter = await start_counter(omni_env, fail_first=2)
    try:
        out = omni_env.reader("inventory.availability.v1")
        dlq = omni_env.reader("inventory.adjustments.v1.dlq")
        async with out, dlq, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
            await channel.publish(adjustment(delta=2))
            (record,) = await out.collect(1, timeout=15)
            assert json.loads(record.value)["on_hand"] == 2
            assert counter.calls == 3
            assert await dlq.collect(1, timeout=1) == []
        m = counter.runtime.metrics
        assert m.handler_retries.labels("counter", "inventory.adjustments.v1")._value.get() == 2
    finally:
        await counter.runtime.stop()


async def test_handler_that_keeps_failing_goes_to_dlq_after_bounded_retries(omni_env) -> None:
    counter = await start_counter(omni_env, fail_first=10**6)
    try:
        dlq = omni_env.reader("inventory.adjustments.v1.dlq")
        async with dlq, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
            await channel.publish(adjustment())
            (dead,) = await dlq.collect(1, timeout=15)
            headers = record_headers(dead)
            assert headers["dlq_reason"] == "handler_failed"
            assert "database blip" in headers["dlq_error"]
            assert counter.calls == counter.runtime.settings.handler_max_attempts
    finally:
        await counter.runtime.stop()


RELAY_SCRIPT = """
import asyncio, sys
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings

async def main():
    runtime = ServiceRuntime(ServiceSettings())
    await runtime.kafka.connect()
    await runtime.relay.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_outbox_loses_nothing_when_the_relay_is_killed(omni_env) -> None:
    """Events committed while no relay runs, and a relay killed mid-flight: all arrive."""
    settings = omni_env.settings("writer")
    writer = ServiceRuntime(settings)
    await writer.start()
    await writer.relay.stop()  # the relay is "dead" between the commit and the publish
    keys = [f"SKU-{i % 7}" for i in range(300)]
    async with writer.transaction() as tx:
        for seq, sku in enumerate(keys):
            await tx.emit(availability(sku, seq))

    reader = omni_env.reader("inventory.availability.v1")
    async with reader:
        env = os.environ | {
            "SERVICE_NAME": "writer",
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "DATABASE_URL": settings.database_url.get_secret_value(),
            "TOPIC_PREFIX": settings.topic_prefix,
        }
        seen: dict[str, list[int]] = defaultdict(list)
        ids: set[str] = set()

        def note(records: list) -> None:
            for record in records:
                ids.add(record_headers(record)["ce_id"])
                seen[record.key.decode()].append(json.loads(record.value)["on_hand"])

        relay = await asyncio.create_subprocess_exec(sys.executable, "-c", RELAY_SCRIPT, env=env)
        try:
            note(await reader.collect(1, timeout=30))  # it has started publishing...
        finally:
            relay.send_signal(signal.SIGKILL)  # ...and dies without warning
            await relay.wait()
        pending = await writer.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )

        await writer.relay.start()  # a restarted relay takes over
        while len(ids) < len(keys):
            batch = await reader.collect(len(keys), timeout=15)
            assert batch, f"only {len(ids)} of {len(keys)} events arrived"
            note(batch)
    await writer.stop()
    assert len(ids) == len(keys)
    # Per-key order: a redelivered batch may repeat a run, never go back before it.
    for sku, values in seen.items():
        firsts = list(dict.fromkeys(values))
        assert firsts == sorted(firsts), sku
    print(f"rows unpublished when the relay was killed: {pending}")


async def test_outbox_rolls_back_with_the_state_change(omni_env) -> None:
    runtime = ServiceRuntime(omni_env.settings("writer"))
    await runtime.start()
    try:
        with pytest.raises(RuntimeError):
            async with runtime.transaction() as tx:
                await tx.emit(availability("SKU-1", 1))
                raise RuntimeError("business rule broken")
        assert await runtime.pool.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await runtime.stop()


async def test_a_two_hop_flow_is_one_trace(omni_env, spans) -> None:
    """A emits (outbox) -> B consumes and emits -> C consumes: one trace id throughout."""
    b = await start_counter(omni_env, name="hop-b")
    c_runtime = ServiceRuntime(omni_env.settings("hop-c"))
    seen = asyncio.get_running_loop().create_future()

    async def on_availability(changes: Lot[AvailabilityChanged]) -> None:
        for _, envelope in changes:
            if not seen.done():
                seen.set_result((trace.get_current_span().get_span_context().trace_id, envelope))

    c_runtime.subscribe(
        Subscription("inventory.availability.v1", {AvailabilityChanged: on_availability})
    )
    a_runtime = ServiceRuntime(omni_env.settings("hop-a"))
    await c_runtime.start()
    await a_runtime.start()
    try:
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("pos checkout") as root:
            async with a_runtime.transaction() as tx:
                sent = await tx.emit(adjustment(delta=4))
        trace_id, envelope = await asyncio.wait_for(seen, 20)
        assert trace_id == root.get_span_context().trace_id
        assert envelope.causation_id == sent.id
        assert envelope.correlation_id == sent.correlation_id
        kafka_spans = [
            s for s in spans.get_finished_spans() if s.kind.name in ("PRODUCER", "CONSUMER")
        ]
        assert {s.context.trace_id for s in kafka_spans} == {trace_id}
        assert len(kafka_spans) >= 4  # two publishes and two consumes
    finally:
        for rt in (a_runtime, b.runtime, c_runtime):
            await rt.stop()


async def test_migrations_are_idempotent_and_per_schema(omni_env) -> None:
    from omni_common.db import migrate

    settings = omni_env.settings("inventory")
    first = await migrate(settings)
    again = await migrate(settings)
    assert first and again == []
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'inventory'"
            )
        }
    finally:
        await conn.close()
    assert {"outbox", "inbox", "schema_migrations"} <= tables


async def emits_a_bad_availability(adjustments: Lot[StockAdjusted], tx: Tx) -> None:
    """A handler with a bug: it builds an event its own model refuses."""
    for event, envelope in adjustments:
        bad = availability(event.sku, 1).model_copy(update={"on_hand": -5})  # not validated
        await tx.emit(bad, caused_by=envelope)


async def test_an_invalid_outgoing_event_names_its_handler_and_nothing_leaves(omni_env) -> None:
    """What leaves is checked against its model before it enters the outbox: the incoming
    event is dead-lettered as ``invalid_output`` with the handler named, and no consumer
    ever sees the bad event."""
    runtime = ServiceRuntime(omni_env.settings("buggy"))
    runtime.subscribe(
        Subscription("inventory.adjustments.v1", {StockAdjusted: emits_a_bad_availability})
    )
    runtime.publishes("inventory.availability.v1")
    await runtime.start()
    try:
        dlq = omni_env.reader("inventory.adjustments.v1.dlq")
        async with dlq, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
            await channel.publish(adjustment())
            (dead,) = await dlq.collect(1, timeout=20)
        headers = record_headers(dead)
        assert headers["dlq_reason"] == "invalid_output"
        assert "emits_a_bad_availability" in headers["dlq_error"]
        assert "inventory.availability.changed" in headers["dlq_error"]
        assert await runtime.pool.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await runtime.stop()
