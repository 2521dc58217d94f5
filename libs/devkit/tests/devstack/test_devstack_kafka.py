"""TansuBroker and create_topics: a broker that serves produce/consume, and the catalogue."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from omni_common.producer import idempotence_supported, producer_options
from omni_common.topics import (
    BrokerUnavailableError,
    TopicsError,
    create_topics,
    wait_for_broker,
)
from omni_contracts.catalogue import TOPICS
from omni_devkit.devstack.kafka import TansuBroker
from omni_devkit.devstack.process import PortInUseError, free_port
from omni_devkit.testing.plugin import TopicReader

pytestmark = pytest.mark.integration


@pytest.mark.tansu
async def test_tansu_starts_and_serves_produce_and_consume() -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="omni-tansu-test-"))
    broker = TansuBroker(free_port(), log_path=log_dir / "tansu.log")
    started = time.monotonic()
    broker.start()
    start_time = time.monotonic() - started
    try:
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        topics = await create_topics(broker.bootstrap_servers, "x.", ["store.sales.v1"])
        assert topics == ["x.store.sales.v1", "x.store.sales.v1.dlq"]
        created = topics[0]
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            for i in range(3):
                await producer.send_and_wait(created, f"sale-{i}".encode(), key=b"store-1")
        finally:
            await producer.stop()
        async with TopicReader(broker.bootstrap_servers, created) as reader:
            records = await reader.collect(3, timeout=10)
        assert [r.value for r in records] == [b"sale-0", b"sale-1", b"sale-2"]

        with pytest.raises(PortInUseError, match="already in use"):
            TansuBroker(broker.port).start()

        # Tansu hands out no producer ids: the producer runs without idempotence there.
        supported, why = await idempotence_supported(broker.bootstrap_servers)
        assert not supported, why
        options = await producer_options(broker.bootstrap_servers)
        assert (options.acks, options.enable_idempotence) == ("all", False)
    finally:
        broker.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    assert broker.pid is None
    assert start_time < 5, f"Tansu took {start_time:.1f}s to start"


@pytest.mark.tansu
async def test_create_topics_creates_the_catalogue_and_dead_letter_topics(
    kafka_bootstrap: str,
) -> None:
    prefix = f"c{uuid.uuid4().hex[:6]}."
    created = await create_topics(kafka_bootstrap, prefix)
    expected = {prefix + spec.name for spec in TOPICS.values()}
    expected |= {prefix + spec.dlq for spec in TOPICS.values()}
    assert set(created) == expected
    assert await create_topics(kafka_bootstrap, prefix) == []  # idempotent

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(sorted(expected))
    finally:
        await admin.close()
    partitions = {d["topic"]: len(d["partitions"]) for d in described}
    for spec in TOPICS.values():
        assert partitions[prefix + spec.name] == spec.partitions
        assert 1 <= partitions[prefix + spec.dlq] <= 3


async def test_unknown_topic_names_are_rejected(kafka_bootstrap: str) -> None:
    with pytest.raises(TopicsError, match=r"not in the topic catalogue: nope\.v1"):
        await create_topics(kafka_bootstrap, "u.", ["nope.v1"])


async def test_wait_for_broker_gives_up_with_a_clear_error() -> None:
    port = free_port()
    with pytest.raises(BrokerUnavailableError, match=f"127.0.0.1:{port} did not answer"):
        await wait_for_broker(f"127.0.0.1:{port}", timeout=0.5)
