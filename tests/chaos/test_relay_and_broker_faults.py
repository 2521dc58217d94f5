"""Publishing-side chaos: the relay killed between commit and publish, the broker frozen.

Each ends with 0 lost, 0 visible duplicates (the consumer's inbox absorbs republished
events), 0 valid events dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
from omni_common.service import ServiceRuntime
from omni_common.topics import create_topics, wait_for_broker
from omni_devkit.devstack.kafka import TansuBroker
from omni_devkit.devstack.process import free_port
from omni_devkit.testing.chaos import EffectCounter, Figures, adjustment, wait_for
from omni_devkit.testing.events import ChannelPublisher, record_headers

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

TOPIC = EffectCounter.TOPIC

RELAY_SCRIPT = """
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


async def test_relay_killed_between_commit_and_publish(omni_env) -> None:
    figures = Figures("relay killed between commit and publish")
    settings = omni_env.settings("writer")
    writer = ServiceRuntime(settings)
    await writer.start()
    await writer.relay.stop()  # dead between the commit and the publish
    events = [adjustment(f"SKU-{i % 11}") for i in range(300)]
    for start in range(0, len(events), 50):
        async with writer.transaction() as tx:
            for event in events[start : start + 50]:
                await tx.emit(event)
    figures.sent = len(events)
    counter = await EffectCounter(ServiceRuntime(omni_env.settings("chaos"))).start()
    reader = omni_env.reader(TOPIC)
    env = os.environ | {
        "SERVICE_NAME": "writer",
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "TOPIC_PREFIX": settings.topic_prefix,
    }
    try:
        async with reader:
            relay = await asyncio.create_subprocess_exec(
                sys.executable, "-c", RELAY_SCRIPT, env=env
            )
            try:
                assert await reader.collect(1, timeout=30)  # it has started publishing...
            finally:
                relay.send_signal(signal.SIGKILL)  # ...and dies without warning
                await relay.wait()
            killed_at = time.monotonic()
            await writer.relay.start()  # a restarted relay takes over

            async def all_applied() -> bool:
                return (await counter.effects())[0] >= len(events)

            await wait_for(all_applied, timeout=40)
            figures.recovered_s = time.monotonic() - killed_at
            figures.applied, figures.duplicates = await counter.effects()
            records = await reader.collect(len(events) * 2, timeout=3)
            ids = [record_headers(r)["ce_id"] for r in records]
            figures.extra["republished"] = len(ids) - len(set(ids))
        dlq = omni_env.reader(f"{TOPIC}.dlq")
        async with dlq:
            figures.dead_lettered = len(await dlq.collect(10, timeout=1))
        figures.report()
        assert figures.applied == figures.sent
        assert figures.duplicates == 0
        assert figures.dead_lettered == 0
    finally:
        await counter.runtime.stop()
        await writer.stop()


@pytest.fixture
async def own_broker(omni_env):
    """A broker of this test's own, to freeze without freezing the other tests' broker."""
    log_dir = Path(tempfile.mkdtemp(prefix="omni-chaos-broker-"))
    broker = TansuBroker(free_port(), log_path=log_dir / "broker.log")
    broker.start()
    try:
        await wait_for_broker(broker.bootstrap_servers, timeout=30)
        await create_topics(broker.bootstrap_servers, prefix=omni_env.prefix)
        yield broker
    finally:
        if broker.pid is not None:
            os.kill(broker.pid, signal.SIGCONT)
        broker.stop()
        shutil.rmtree(log_dir, ignore_errors=True)


FREEZE_S = 30.0


async def test_broker_frozen_30s(omni_env, own_broker) -> None:
    figures = Figures(f"broker frozen {FREEZE_S:.0f}s (SIGSTOP/SIGCONT)")
    bootstrap = own_broker.bootstrap_servers
    settings = omni_env.settings("chaos", kafka_bootstrap_servers=bootstrap)
    counter = await EffectCounter(ServiceRuntime(settings)).start()
    before = [adjustment(f"SKU-{i % 8}") for i in range(50)]
    during = [adjustment(f"SKU-{i % 8}") for i in range(50)]
    try:
        async with ChannelPublisher(bootstrap, omni_env.prefix) as channel:
            for event in before:
                await channel.publish(event)

            async def applied(n: int) -> bool:
                return (await counter.effects())[0] >= n

            await wait_for(lambda: applied(len(before)), timeout=30)
            assert own_broker.pid is not None
            os.kill(own_broker.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            # Channels keep selling: their sends wait in the producer until the broker is back.
            sends = asyncio.gather(*(channel.publish(e) for e in during))
            await asyncio.sleep(FREEZE_S)
            os.kill(own_broker.pid, signal.SIGCONT)
            thawed_at = time.monotonic()
            await sends
            figures.sent = len(before) + len(during)
            await wait_for(lambda: applied(figures.sent), timeout=45)
            figures.recovered_s = time.monotonic() - thawed_at
            figures.extra["frozen_s"] = round(thawed_at - frozen_at, 1)
            figures.applied, figures.duplicates = await counter.effects()

        # Every effect's event reached the outbound topic (the relay rode out the freeze).
        async def all_published() -> bool:
            return not await counter.runtime.pool.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )

        await wait_for(all_published, timeout=30)
        from omni_devkit.testing.plugin import TopicReader

        dlq = TopicReader(bootstrap, omni_env.topic(f"{TOPIC}.dlq"))
        async with dlq:
            figures.dead_lettered = len(await dlq.collect(10, timeout=1))
        figures.report()
        assert figures.applied == figures.sent
        assert figures.duplicates == 0
        assert figures.dead_lettered == 0
    finally:
        await counter.runtime.stop()
