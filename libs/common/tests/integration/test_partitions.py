"""Partitions are independent: one stuck partition never stops the others, each message
keeps its own trace, and a rebalance hands partitions over without a second effect."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.errors import KafkaConnectionError
from omni_common.handlers import Lot, Subscription
from omni_common.service import ServiceRuntime, Tx
from omni_contracts import AvailabilityChanged, StockAdjusted
from omni_contracts.envelope import Envelope, encode, new_envelope
from omni_devkit.testing.events import record_headers

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
TOPIC = "inventory.adjustments.v1"


def adjustment(sku: str) -> StockAdjusted:
    return StockAdjusted(
        adjustment_id=str(uuid.uuid4()),
        location_id="store-1",
        sku=sku,
        kind="receipt",
        delta=1,
        occurred_at=NOW,
    )


async def send(
    producer: AIOKafkaProducer,
    omni_env,
    event: StockAdjusted,
    partition: int,
    traceparent: str | None = None,
) -> Envelope:
    envelope = new_envelope(event, source="/channels/test")
    headers = envelope.headers() | ({"traceparent": traceparent} if traceparent else {})
    await producer.send_and_wait(
        omni_env.topic(TOPIC),
        encode(event),
        key=event.sku.encode(),
        partition=partition,
        headers=[(k, v.encode()) for k, v in headers.items()],
    )
    return envelope


async def wait_until(predicate, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_a_stuck_partition_is_paused_and_the_others_flow(omni_env) -> None:
    release = asyncio.Event()
    handled: list[str] = []

    async def on_adjusted(adjustments: Lot[StockAdjusted], tx: Tx) -> None:
        for event, _ in adjustments:
            if event.sku.startswith("STUCK"):
                await release.wait()
            tx.after_commit(lambda e=event: handled.append(e.adjustment_id))

    runtime = ServiceRuntime(omni_env.settings("stuck", consumer_queue_size=2))
    runtime.subscribe(Subscription(TOPIC, {StockAdjusted: on_adjusted}))
    await runtime.start()
    producer = AIOKafkaProducer(bootstrap_servers=omni_env.bootstrap, linger_ms=0)
    await producer.start()
    try:
        stuck = [adjustment(f"STUCK-{i}") for i in range(30)]
        free = [adjustment(f"FREE-{i}") for i in range(30)]
        for event in stuck:
            await send(producer, omni_env, event, partition=0)
        for i, event in enumerate(free):
            await send(producer, omni_env, event, partition=1 + i % 5)
        # On the old code the fetch loop blocked on the stuck partition's full queue.
        await wait_until(lambda: {e.adjustment_id for e in free} <= set(handled))
        assert not any(e.adjustment_id in handled for e in stuck)
        m = runtime.metrics
        assert m.partitions_paused.labels("stuck", omni_env.topic(TOPIC))._value.get() >= 1
        release.set()
        await wait_until(lambda: len(handled) == len(stuck) + len(free))
        # In order, each once: pausing dropped nothing and repeated nothing.
        assert [a for a in handled if a in {e.adjustment_id for e in stuck}] == [
            e.adjustment_id for e in stuck
        ]
    finally:
        release.set()
        await producer.stop()
        await runtime.stop()


async def test_each_message_keeps_its_own_trace(omni_env) -> None:
    """Events handled in one lot still carry on each in its own trace: what each causes is
    published in the trace of the event that caused it, not of the lot's first."""

    async def on_adjusted(adjustments: Lot[StockAdjusted], tx: Tx) -> None:
        for event, envelope in adjustments:
            await tx.emit(
                AvailabilityChanged(
                    sku=event.sku,
                    location_id=event.location_id,
                    on_hand=1,
                    reserved=0,
                    available=1,
                    status="in_stock",
                    previous_status="out_of_stock",
                    online_available=1,
                    cause="adjustment",
                    changed_at=NOW,
                ),
                caused_by=envelope,
            )

    runtime = ServiceRuntime(omni_env.settings("traced"))
    runtime.subscribe(Subscription(TOPIC, {StockAdjusted: on_adjusted}))
    runtime.publishes("inventory.availability.v1")
    producer = AIOKafkaProducer(bootstrap_servers=omni_env.bootstrap, linger_ms=0)
    await producer.start()
    reader = omni_env.reader("inventory.availability.v1")
    try:
        trace_ids = [uuid.uuid4().int & ((1 << 128) - 1) for _ in range(5)]
        for trace_id in trace_ids:
            parent = f"00-{trace_id:032x}-{uuid.uuid4().hex[:16]}-01"
            await send(producer, omni_env, adjustment("SKU-1"), partition=0, traceparent=parent)
        async with reader:
            await runtime.start()  # all five wait: they are handled as one lot
            records = await reader.collect(len(trace_ids), timeout=20)
        seen = [int(record_headers(r)["traceparent"].split("-")[1], 16) for r in records]
        assert seen == trace_ids  # not the first message's trace five times
    finally:
        await producer.stop()
        await runtime.stop()


async def test_a_rebalance_commits_what_was_handled_and_hands_over_the_rest(omni_env) -> None:
    """A second instance joins mid-stream: every message is handled, none twice."""
    calls: list[str] = []
    by_instance: dict[str, int] = {"first": 0, "second": 0}

    def instance(name: str) -> ServiceRuntime:
        async def on_adjusted(adjustments: Lot[StockAdjusted], tx: Tx) -> None:
            for event, _ in adjustments:
                await asyncio.sleep(0.005)  # work in flight when the revocation comes

                def committed(adjustment_id: str = event.adjustment_id) -> None:
                    calls.append(adjustment_id)
                    by_instance[name] += 1

                tx.after_commit(committed)

        # A long commit interval: only the revocation's commit can save a second handling.
        settings = omni_env.settings("rebalanced", consumer_commit_interval_ms=60_000)
        runtime = ServiceRuntime(settings)
        runtime.subscribe(Subscription(TOPIC, {StockAdjusted: on_adjusted}))
        return runtime

    first, second = instance("first"), instance("second")
    await first.start()
    producer = AIOKafkaProducer(bootstrap_servers=omni_env.bootstrap, linger_ms=0)
    await producer.start()
    sent: list[str] = []
    try:

        async def burst(n: int) -> None:
            for i in range(n):
                event = adjustment(f"SKU-{i}")
                sent.append(event.adjustment_id)
                await send(producer, omni_env, event, partition=i % 6)

        await burst(120)
        await wait_until(lambda: len(calls) >= 60)
        await second.start()  # joins: the first gives up some partitions
        await burst(120)
        await wait_until(lambda: set(sent) <= set(calls), timeout=40)
        await asyncio.sleep(0.5)
        assert len(calls) == len(set(calls)), "a handed-over message was handled again"
        assert by_instance["second"] > 0, by_instance  # partitions did move
    finally:
        await producer.stop()
        await second.stop()
        await first.stop()


async def test_a_rewind_to_a_record_retention_deleted_goes_on_from_the_oldest_kept(
    omni_env,
) -> None:
    """A partition rewinds to a record it could not even dead-letter; meanwhile retention
    deleted it. The consumer starts again at the oldest record kept, and goes on: on the old
    code the worker waited for exactly the rewound offset, which never came again."""
    handled: list[str] = []

    async def on_adjusted(adjustments: Lot[StockAdjusted], tx: Tx) -> None:
        for event, _ in adjustments:
            tx.after_commit(lambda e=event: handled.append(e.adjustment_id))

    settings = omni_env.settings("retained", handler_backoff_max_s=0.2)
    runtime = ServiceRuntime(settings)
    runtime.subscribe(Subscription(TOPIC, {StockAdjusted: on_adjusted}))
    topic = omni_env.topic(TOPIC)
    admin = AIOKafkaAdminClient(bootstrap_servers=omni_env.bootstrap)
    await admin.start()
    send_dlq = runtime.dispatcher._send
    failed = 0

    async def dlq_down_while_retention_runs(*args: Any) -> Any:
        nonlocal failed
        if failed == 0:
            failed += 1
            # Retention removes the poison record and the one after it, then the DLQ fails.
            await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(2)})
            raise KafkaConnectionError("the DLQ is unreachable")
        return await send_dlq(*args)

    runtime.dispatcher._send = dlq_down_while_retention_runs  # type: ignore[method-assign]
    producer = AIOKafkaProducer(bootstrap_servers=omni_env.bootstrap, linger_ms=0)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, b"{not json", key=b"SKU-1", partition=0, headers=[("ce_type", b"x.y")]
        )
        events = [adjustment("SKU-1") for _ in range(4)]
        for event in events:
            await send(producer, omni_env, event, partition=0)
        await runtime.start()
        await wait_until(lambda: failed == 1)
        # The rewind found offsets 0 and 1 gone: the partition goes on from the oldest kept,
        # and what arrives later is handled too. Each event once (the inbox absorbs what the
        # rewind brings again).
        later = adjustment("SKU-1")
        await send(producer, omni_env, later, partition=0)
        await wait_until(lambda: later.adjustment_id in handled)
        assert sorted(handled) == sorted(e.adjustment_id for e in [*events, later])
    finally:
        await producer.stop()
        await admin.close()
        await runtime.stop()
