"""A real Apache Kafka broker SIGKILLed and restarted on its log directory mid-traffic.

Events go out through a service's outbox while the broker dies and comes back; a consumer
service applies them through its inbox. Nothing may be lost, and what the restart makes
either side send again must be absorbed by the inbox. Skipped without Java (Tansu keeps
its topics in memory: a restart there loses them by design).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from omni_common.handlers import Lot, Subscription
from omni_common.service import ServiceRuntime, Tx
from omni_contracts import AvailabilityChanged
from omni_devkit.devstack.kafka import ApacheKafkaBroker, find_java
from omni_devkit.devstack.process import free_port
from omni_devkit.testing.plugin import isolated_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_java()[0] is None, reason="needs Apache Kafka (a Java 17+ runtime)"),
]

SENT = 400
BATCH = 10
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def availability(sku: str, on_hand: int) -> AvailabilityChanged:
    return AvailabilityChanged(
        sku=sku,
        location_id="store-1",
        on_hand=on_hand,
        reserved=0,
        available=on_hand,
        status="in_stock" if on_hand else "out_of_stock",
        previous_status="out_of_stock",
        online_available=on_hand,
        cause="adjustment",
        changed_at=NOW,
    )


class Applier:
    """The consuming side: one row per event applied, a count of duplicates absorbed."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.applied = 0
        self.first_after_restart: float | None = None
        self.restarted_at: float | None = None
        self.all_applied = asyncio.Event()

    async def on_availability(self, changes: Lot[AvailabilityChanged], tx: Tx) -> None:
        for event, envelope in changes:
            await tx.conn.execute(
                "INSERT INTO applied (ce_id, sku, on_hand) VALUES ($1, $2, $3)",
                envelope.id,
                event.sku,
                event.on_hand,
            )
            tx.after_commit(self._counted)

    @property
    def duplicates(self) -> int:
        """Redeliveries the inbox recognised (the runtime never hands them over)."""
        m = self.runtime.metrics
        child = m.events_handled.labels(
            m.service, "inventory.availability.v1", "inventory.availability.changed", "duplicate"
        )
        return int(child._value.get())

    def _counted(self) -> None:
        self.applied += 1
        if self.applied >= SENT:
            self.all_applied.set()
        if self.restarted_at is not None and self.first_after_restart is None:
            self.first_after_restart = time.monotonic()


@pytest.fixture
def crash_broker() -> ApacheKafkaBroker:
    scratch = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="omni-kafka-crash-", dir=scratch))
    broker = ApacheKafkaBroker(free_port(), data_dir=root, log_path=root / "kafka.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_broker_kill_9_and_restart_loses_nothing(
    crash_broker: ApacheKafkaBroker, postgres_url: str
) -> None:
    async with isolated_env(crash_broker.bootstrap_servers, postgres_url) as env:
        writer = ServiceRuntime(env.settings("crash-writer"))
        writer.publishes("inventory.availability.v1")
        consumer = ServiceRuntime(env.settings("crash-applier"))
        applier = Applier(consumer)
        handlers = {AvailabilityChanged: applier.on_availability}
        consumer.subscribe(Subscription("inventory.availability.v1", handlers))
        await writer.start()
        await consumer.start()
        try:
            async with consumer.transaction() as tx:
                await tx.conn.execute(
                    "CREATE TABLE applied (ce_id text PRIMARY KEY, sku text, on_hand int)"
                )
            kill_at = SENT // (2 * BATCH)
            recovered_in = None
            for batch in range(SENT // BATCH):
                if batch == kill_at:
                    crash_broker.kill()  # SIGKILL, mid-traffic
                    killed_at = time.monotonic()
                if batch == kill_at + 5:  # events keep piling up in the outbox meanwhile
                    await asyncio.to_thread(crash_broker.start)
                    applier.restarted_at = time.monotonic()
                async with writer.transaction() as tx:
                    for i in range(BATCH):
                        seq = batch * BATCH + i
                        await tx.emit(availability(f"SKU-{seq % 13}", seq))
                await asyncio.sleep(0.05)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(applier.all_applied.wait(), 120)
            if applier.first_after_restart is not None:
                recovered_in = applier.first_after_restart - killed_at
            rows = await consumer.pool.fetchval("SELECT count(*) FROM applied")
            unpublished = await writer.pool.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
        finally:
            await consumer.stop()
            await writer.stop()
        print(
            f"broker kill -9: sent={SENT} applied={applier.applied} rows={rows} "
            f"duplicates={applier.duplicates} unpublished={unpublished} "
            f"time_to_recover={recovered_in if recovered_in is None else round(recovered_in, 1)}s"
        )
        assert rows == SENT, f"lost {SENT - rows} of {SENT} events"
        assert applier.applied == SENT  # each applied once: the rest were absorbed duplicates
