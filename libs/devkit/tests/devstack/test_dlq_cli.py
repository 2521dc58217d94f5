"""``omni dlq list|show|replay`` against the real broker, on messages a service dead-lettered."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from omni_common.handlers import Lot, Refusal, Subscription
from omni_common.service import ServiceRuntime, Tx
from omni_contracts import StockAdjusted
from omni_devkit.cli import app
from omni_devkit.devstack.process import free_port
from omni_devkit.dlq import DlqError, parse_since
from omni_devkit.testing.events import ChannelPublisher, ce_headers, record_headers
from typer.testing import CliRunner

pytestmark = pytest.mark.integration
TOPIC = "inventory.adjustments.v1"
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def adjustment(sku: str) -> StockAdjusted:
    return StockAdjusted(
        adjustment_id=str(uuid.uuid4()),
        location_id="store-1",
        sku=sku,
        kind="receipt",
        delta=2,
        occurred_at=NOW,
    )


class Mender:
    """Refuses every SKU until the cause is mended; then applies each event once."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.broken = True
        self.applied: list[str] = []

    async def on_adjusted(self, adjustments: Lot[StockAdjusted], tx: Tx) -> None:
        for event, envelope in adjustments:
            if self.broken:
                raise Refusal("unknown_sku", event.sku)
            tx.after_commit(lambda e=envelope: self.applied.append(e.id))

    @property
    def duplicates(self) -> int:
        """Replays the inbox recognised (the runtime never hands them over)."""
        m = self.runtime.metrics
        child = m.events_handled.labels(m.service, TOPIC, "inventory.stock.adjusted", "duplicate")
        return int(child._value.get())


def omni(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


async def wait_for(predicate, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_since_takes_durations_and_iso_times() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-11-30T08:00:00", now) == datetime(2026, 11, 30, 8, tzinfo=UTC)
    with pytest.raises(DlqError, match="neither a duration"):
        parse_since("yesterday", now)


async def test_list_show_and_replay_dead_letters(omni_env) -> None:
    runtime = ServiceRuntime(omni_env.settings("mender"))
    mender = Mender(runtime)
    runtime.subscribe(Subscription(TOPIC, {StockAdjusted: mender.on_adjusted}))
    await runtime.start()
    where = ["--bootstrap", omni_env.bootstrap, "--prefix", omni_env.prefix]
    try:
        dlq = omni_env.reader(f"{TOPIC}.dlq")
        async with dlq, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
            sent = [await channel.publish(adjustment(f"SKU-{i}")) for i in range(3)]
            await channel.publish_raw(
                TOPIC, b"{not json", key="SKU-9", headers=ce_headers("inventory.stock.adjusted")
            )
            assert len(await dlq.collect(4, timeout=20)) == 4

        code, out = omni("dlq", "list", TOPIC, *where)
        assert code == 0, out
        assert "4 dead-lettered" in out and "3 unknown_sku" in out and "1 malformed_json" in out
        for envelope in sent:
            assert envelope.id in out
        code, out = omni("dlq", "list", f"{TOPIC}.dlq", "--reason", "unknown_sku", *where)
        assert code == 0 and "3 dead-lettered" in out, out
        code, out = omni("dlq", "list", TOPIC, "--since", "2099-01-01", *where)
        assert code == 0 and "0 dead-lettered" in out, out

        code, out = omni("dlq", "show", TOPIC, sent[0].id, *where)
        assert code == 0, out
        assert "dlq_reason: unknown_sku" in out and f"ce_id: {sent[0].id}" in out
        assert '"sku": "SKU-0"' in out

        mender.broken = False  # the cause is mended
        code, out = omni("dlq", "replay", TOPIC, "--reason", "unknown_sku", "--dry-run", *where)
        assert code == 0 and "3 would be replayed" in out, out
        code, out = omni("dlq", "replay", TOPIC, "--reason", "unknown_sku", *where)
        assert code == 0 and "3 replayed" in out and "3/3" in out, out
        await wait_for(lambda: len(mender.applied) == 3)
        assert sorted(mender.applied) == sorted(e.id for e in sent)  # ce_id kept

        code, out = omni("dlq", "replay", TOPIC, "--reason", "unknown_sku", *where)
        assert code == 0 and "3 replayed" in out, out
        await wait_for(lambda: mender.duplicates == 3)  # a second replay is harmless
        assert len(mender.applied) == 3

        source = omni_env.reader(TOPIC)
        async with source:
            records = await source.collect(10, timeout=10)
        replayed = [r for r in records if r.offset >= 0 and record_headers(r).get("ce_id")]
        by_id = [record_headers(r)["ce_id"] for r in replayed]
        assert by_id.count(sent[0].id) == 3  # the original and two replays
        assert not any(k.startswith("dlq_") for r in replayed for k in record_headers(r))
    finally:
        await runtime.stop()


async def test_failures_are_one_line_and_a_non_zero_exit(omni_env) -> None:
    code, out = omni(
        "dlq", "list", "nope.v1", "--bootstrap", omni_env.bootstrap, "--prefix", omni_env.prefix
    )
    assert code == 1
    assert out.strip().splitlines() == [f"error: topic {omni_env.prefix}nope.v1.dlq does not exist"]
    code, out = omni("dlq", "replay", TOPIC, "--bootstrap", f"127.0.0.1:{free_port()}")
    assert code == 1
    assert len(out.strip().splitlines()) == 1 and out.startswith("error: cannot reach"), out
    code, out = omni("dlq", "list", TOPIC, "--since", "soon", "--bootstrap", omni_env.bootstrap)
    assert code == 1 and "neither a duration" in out


# -- purge -----------------------------------------------------------------------------------


async def _dead_letters(omni_env, topic: str, partition: int) -> list:
    from omni_devkit.dlq import read_dead_letters

    letters = await read_dead_letters(omni_env.bootstrap, omni_env.topic(topic))
    return sorted((item for item in letters if item.partition == partition), key=lambda i: i.offset)


async def test_purge_removes_one_shoppers_dead_letters_and_keeps_the_others(omni_env) -> None:
    from aiokafka import AIOKafkaProducer

    customer = f"c-{uuid.uuid4().hex[:6]}"
    dlq = f"{TOPIC}.dlq"
    reason = [("dlq_reason", b"malformed_json")]
    records = [  # (key, value, headers) on partition 0
        (b"SKU-1", b'{"sku": "SKU-1"}', [("ce_id", b"keep-1"), *reason]),
        (customer.encode(), b'{"sku": "SKU-2"}', [("ce_id", b"by-key"), *reason]),
        (b"SKU-3", b'{"sku": "SKU-3"}', [("ce_subject", customer.encode()), *reason]),
        (b"SKU-4", f'{{"customer_id": "{customer}0"}}'.encode(), [("ce_id", b"keep-4")]),
        (b"SKU-5", b'{"broken": "jane@example.org", ', [("ce_id", b"by-email"), *reason]),
        (b"SKU-6", b'{"note": "+33 6 12 34 56 78"}', [("ce_id", b"by-phone")]),
        (b"SKU-7", f'{{"customer_id": "{customer}"}}'.encode(), [("ce_id", b"by-value")]),
        (b"SKU-8", b'{"sku": "SKU-8"}', [("ce_id", b"after")]),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=omni_env.bootstrap)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(
                omni_env.topic(dlq), value, key=key, partition=0, headers=headers
            )
        # Someone else's entry on another partition, and this shopper's on a third.
        await producer.send_and_wait(
            omni_env.topic(dlq), b"{}", key=b"x", partition=1, headers=[("ce_id", b"p1")]
        )
        await producer.send_and_wait(
            omni_env.topic(dlq), b"{}", key=customer.encode(), partition=2, headers=[]
        )
    finally:
        await producer.stop()
    where = ["--bootstrap", omni_env.bootstrap, "--prefix", omni_env.prefix]
    who = ["--customer", customer, "--email", "Jane@Example.org", "--phone", "+33612345678"]

    code, out = omni("dlq", "purge", *who, "--dry-run", *where)
    assert code == 0, out
    assert "6 dead letters naming" in out and "would be removed from 1 topics" in out, out
    assert len(await _dead_letters(omni_env, dlq, 0)) == len(records)  # a dry run changes nothing

    code, out = omni("dlq", "purge", *who, *where)
    assert code == 0, out
    lines = out.strip().splitlines()
    assert f"{omni_env.topic(dlq)}: 10 read, removed 6 naming the shopper, rewrote 2 others" in out
    assert lines[-1] == f"6 dead letters naming {customer} removed from 1 topics", out
    left = await _dead_letters(omni_env, dlq, 0)
    assert [(item.header("ce_id"), item.header("dlq_rewritten_from")) for item in left] == [
        ("after", ""),
        ("keep-1", "0:0"),
        ("keep-4", "0:3"),
    ]
    copy = left[1]
    assert (copy.key, copy.value, copy.reason) == (b"SKU-1", b'{"sku": "SKU-1"}', "malformed_json")
    assert copy.offset > left[0].offset
    assert [i.header("ce_id") for i in await _dead_letters(omni_env, dlq, 1)] == ["p1"]
    assert await _dead_letters(omni_env, dlq, 2) == []

    # Again: nothing names the shopper any more, nothing changes.
    code, out = omni("dlq", "purge", *who, *where)
    assert code == 0 and out.strip().splitlines()[-1].startswith("0 dead letters"), out
    assert [i.offset for i in await _dead_letters(omni_env, dlq, 0)] == [i.offset for i in left]


async def test_a_purge_that_stopped_after_copying_does_not_copy_twice(omni_env) -> None:
    from aiokafka import AIOKafkaProducer

    customer = f"c-{uuid.uuid4().hex[:6]}"
    dlq = omni_env.topic(f"{TOPIC}.dlq")
    producer = AIOKafkaProducer(bootstrap_servers=omni_env.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(dlq, b"{}", key=b"other", partition=0)
        await producer.send_and_wait(dlq, b"{}", key=customer.encode(), partition=0)
        # The copy an interrupted run wrote before it could delete.
        await producer.send_and_wait(
            dlq, b"{}", key=b"other", partition=0, headers=[("dlq_rewritten_from", b"0:0")]
        )
    finally:
        await producer.stop()
    code, out = omni(
        "dlq", "purge", "--customer", customer, "--bootstrap", omni_env.bootstrap,
        "--prefix", omni_env.prefix,
    )  # fmt: skip
    assert code == 0 and "rewrote 0 others (1 copied by an earlier run)" in out, out
    left = await _dead_letters(omni_env, f"{TOPIC}.dlq", 0)
    assert [(i.offset, i.key, i.header("dlq_rewritten_from")) for i in left] == [
        (2, b"other", "0:0")
    ]


def test_purge_failures_are_one_line_and_a_non_zero_exit() -> None:
    code, out = omni("dlq", "purge", "--customer", "c-1", "--bootstrap", f"127.0.0.1:{free_port()}")
    assert code == 1 and "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("error: cannot reach the Kafka broker"), out
    code, out = omni("dlq", "purge", "--customer", " ", "--bootstrap", "127.0.0.1:1")
    assert code == 1 and out.strip() == "error: --customer must name a customer id", out
