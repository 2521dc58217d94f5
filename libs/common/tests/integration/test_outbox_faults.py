"""The outbox under faults: a row the broker refuses is parked, the rest flow; a frozen
relay leader loses its leadership within seconds and a standby takes over."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest
from omni_common.service import ServiceRuntime
from omni_contracts import AvailabilityChanged
from omni_devkit.testing.events import record_headers

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
TOPIC = "inventory.availability.v1"


def availability(sku: str, on_hand: int) -> AvailabilityChanged:
    return AvailabilityChanged(
        sku=sku,
        location_id="store-1",
        on_hand=on_hand,
        reserved=0,
        available=on_hand,
        status="in_stock",
        previous_status="out_of_stock",
        online_available=on_hand,
        cause="adjustment",
        changed_at=NOW,
    )


async def test_an_oversized_row_is_parked_with_its_error_and_the_rest_are_published(
    omni_env,
) -> None:
    runtime = ServiceRuntime(omni_env.settings("writer"))
    await runtime.start()
    try:
        reader = omni_env.reader(TOPIC)
        async with reader:
            async with runtime.transaction() as tx:
                first = await tx.emit(availability("SKU-1", 1))
                # Written past the border's checks (a bug, an old row): 3 MB, beyond what the
                # producer and the topic accept.
                await tx.conn.execute(
                    "INSERT INTO outbox (ce_id, ce_type, topic, key, headers, payload)"
                    " VALUES ($1, 'inventory.availability.changed', $2, 'SKU-2', '{}', $3)",
                    uuid.uuid4(),
                    TOPIC,
                    b"x" * 3_000_000,
                )
                last = await tx.emit(availability("SKU-3", 3))
            records = await reader.collect(2, timeout=20)
            assert {record_headers(r)["ce_id"] for r in records} == {first.id, last.id}
            assert await reader.collect(1, timeout=1) == []

            parked = await runtime.pool.fetch(
                "SELECT key, last_error FROM outbox WHERE parked_at IS NOT NULL"
            )
            assert [r["key"] for r in parked] == ["SKU-2"]
            assert "TooLarge" in parked[0]["last_error"]

            # Later events are not held up by the parked row.
            async with runtime.transaction() as tx:
                after = await tx.emit(availability("SKU-2", 4))
            (record,) = await reader.collect(1, timeout=10)
            assert record_headers(record)["ce_id"] == after.id
            assert json.loads(record.value)["on_hand"] == 4

        m = runtime.metrics

        async def gauge() -> float:
            return m.outbox_parked.labels("writer")._value.get()

        deadline = time.monotonic() + 5
        while await gauge() != 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert await gauge() == 1
        assert m.outbox_parked_rows.labels("writer", TOPIC)._value.get() == 1
    finally:
        await runtime.stop()


LEADER_SCRIPT = """
import asyncio
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings

async def main():
    runtime = ServiceRuntime(ServiceSettings())
    await runtime.kafka.connect()
    await runtime.relay.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_frozen_relay_leader_loses_leadership_within_seconds(omni_env) -> None:
    settings = omni_env.settings("writer")
    writer = ServiceRuntime(settings)
    await writer.start()
    await writer.relay.stop()
    env = os.environ | {
        "SERVICE_NAME": "writer",
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "TOPIC_PREFIX": settings.topic_prefix,
    }
    leader = await asyncio.create_subprocess_exec(sys.executable, "-c", LEADER_SCRIPT, env=env)
    reader = omni_env.reader(TOPIC)
    try:
        async with reader:
            async with writer.transaction() as tx:
                await tx.emit(availability("SKU-1", 1))
            assert await reader.collect(1, timeout=30)  # the subprocess leads
            await writer.relay.start()  # a standby in this process
            leader.send_signal(signal.SIGSTOP)  # frozen: its TCP connection stays open
            frozen_at = time.monotonic()
            async with writer.transaction() as tx:
                sent = await tx.emit(availability("SKU-1", 2))
            # The frozen leader may not have marked the first row: it comes again first.
            record = await reader.next(lambda r: record_headers(r)["ce_id"] == sent.id, timeout=30)
            took = time.monotonic() - frozen_at
            assert json.loads(record.value)["on_hand"] == 2
            print(f"standby took over {took:.1f}s after the leader froze")
            assert took < 20
    finally:
        leader.send_signal(signal.SIGKILL)
        await leader.wait()
        await writer.stop()


async def test_a_standby_relay_stops_at_once(omni_env) -> None:
    """A relay waiting for the leadership stops when asked, not after the stop grace (every
    replica but one is a standby: each shutdown of theirs waited 5 s)."""
    leader = ServiceRuntime(omni_env.settings("writer"))
    standby = ServiceRuntime(omni_env.settings("writer"))
    await leader.start()
    try:
        await standby.start()
        await asyncio.sleep(0.5)  # the standby has tried the lock and waits for the next try
        started = time.monotonic()
        await standby.relay.stop()
        assert time.monotonic() - started < 1.0
    finally:
        await standby.stop()
        await leader.stop()


async def test_the_relay_purges_expired_rows_in_short_bounded_statements(omni_env) -> None:
    """A long backlog of expired inbox and outbox rows goes in several short DELETEs, none
    over the bound: one DELETE of them all held locks long enough to cost the leadership."""
    runtime = ServiceRuntime(omni_env.settings("writer"))
    await runtime.start()
    try:
        await runtime.relay.stop()
        bound = runtime.relay.purge_batch_size
        expired = 2 * bound + bound // 2
        pool = runtime.pool
        # A statement-level trigger sees each DELETE whole: its row count is the statement's.
        await pool.execute(
            "CREATE TABLE purge_log (tbl text, deleted int);"
            " CREATE FUNCTION log_purge() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN INSERT INTO purge_log SELECT TG_TABLE_NAME, count(*) FROM gone;"
            " RETURN NULL; END $$;"
            " CREATE TRIGGER inbox_purge AFTER DELETE ON inbox REFERENCING OLD TABLE AS gone"
            "  FOR EACH STATEMENT EXECUTE FUNCTION log_purge();"
            " CREATE TRIGGER outbox_purge AFTER DELETE ON outbox REFERENCING OLD TABLE AS gone"
            "  FOR EACH STATEMENT EXECUTE FUNCTION log_purge();"
        )
        await pool.execute(
            "INSERT INTO inbox (consumer, ce_id, ce_type, received_at)"
            " SELECT 'c', gen_random_uuid(), 't', now() - interval '9 days'"
            " FROM generate_series(1, $1)",
            expired,
        )
        await pool.execute(
            "INSERT INTO inbox (consumer, ce_id, ce_type) SELECT 'c', gen_random_uuid(), 't'"
            " FROM generate_series(1, 10)"
        )
        await pool.execute(
            "INSERT INTO outbox (ce_id, ce_type, topic, headers, payload, published_at)"
            " SELECT gen_random_uuid(), 't', 'x', '{}', '', now() - interval '2 days'"
            " FROM generate_series(1, $1)",
            expired,
        )
        await runtime.relay.start()  # purges on its first idle round

        async def purged() -> bool:
            return await pool.fetchval("SELECT count(*) FROM inbox") == 10 and not (
                await pool.fetchval("SELECT count(*) FROM outbox")
            )

        deadline = time.monotonic() + 20
        while not await purged() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert await purged()
        for table in ("inbox", "outbox"):
            sizes = [
                r["deleted"]
                for r in await pool.fetch(
                    "SELECT deleted FROM purge_log WHERE tbl = $1 AND deleted > 0", table
                )
            ]
            assert sum(sizes) == expired, table
            assert len(sizes) >= 3 and max(sizes) <= bound, (table, sizes)
    finally:
        await runtime.stop()


async def test_a_lingering_relay_publishes_the_first_row_at_once_and_the_next_together(
    omni_env,
) -> None:
    """``OUTBOX_RELAY_LINGER_MS``: a quiet relay never waits; after a round that published,
    what commits meanwhile goes out in one round."""
    runtime = ServiceRuntime(omni_env.settings("writer", outbox_relay_linger_ms=1000))
    rounds: list[int] = []
    relay_once = runtime.relay.relay_once

    async def counted(conn):  # type: ignore[no-untyped-def]
        published = await relay_once(conn)
        if published:
            rounds.append(published)
        return published

    runtime.relay.relay_once = counted  # type: ignore[method-assign]
    await runtime.start()
    try:
        reader = omni_env.reader(TOPIC)
        async with reader:
            await asyncio.sleep(1.5)  # quiet: the relay waits for rows
            started = time.monotonic()
            async with runtime.transaction() as tx:
                await tx.emit(availability("SKU-0", 1))
            assert len(await reader.collect(1, timeout=10)) == 1
            assert time.monotonic() - started < 0.9  # not delayed by the linger
            for n in range(5):  # each its own transaction, each waking the relay
                async with runtime.transaction() as tx:
                    await tx.emit(availability(f"SKU-{n + 1}", n))
            assert len(await reader.collect(5, timeout=10)) == 5
        assert rounds == [1, 5]
    finally:
        await runtime.stop()
