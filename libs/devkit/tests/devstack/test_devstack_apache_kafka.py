"""ApacheKafkaBroker: Java detection, the broker choice, and a durable broker that restarts."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from omni_common.producer import PRODUCER_MAX_REQUEST_SIZE, producer_options
from omni_common.topics import create_topics
from omni_devkit.devstack.kafka import (
    ApacheKafkaBroker,
    choose_broker,
    find_java,
    java_major_version,
    kafka_jars_ready,
    kafka_version,
)
from omni_devkit.devstack.process import DevStackError, PortInUseError, free_port
from omni_devkit.testing.plugin import TopicReader

needs_java = pytest.mark.skipif(find_java()[0] is None, reason="no Java 17+ runtime")


def fake_java(tmp_path: Path, version_line: str) -> str:
    """An executable that answers ``-version`` like a JVM does (on stderr)."""
    path = tmp_path / "java"
    path.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize(
    ("line", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"', 8),
        ("no version here", None),
    ],
)
def test_java_major_version_reads_what_java_prints(tmp_path: Path, line: str, major: int) -> None:
    assert java_major_version(fake_java(tmp_path, line)) == major


def test_an_old_java_means_tansu_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_java(tmp_path, 'java version "1.8.0_392"')
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.delenv("OMNI_BROKER", raising=False)
    choice = choose_broker()
    assert choice.kind == "tansu"
    assert "Java 8" in choice.reason and "17+" in choice.reason
    monkeypatch.setenv("OMNI_BROKER", "kafka")
    with pytest.raises(DevStackError, match="OMNI_BROKER=kafka but"):
        choose_broker()


def test_omni_broker_forces_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_BROKER", "tansu")
    assert choose_broker().kind == "tansu"
    monkeypatch.setenv("OMNI_BROKER", "redpanda")
    with pytest.raises(DevStackError, match="auto, kafka or tansu"):
        choose_broker()


@needs_java
def test_java_on_this_machine_means_apache_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNI_BROKER", raising=False)
    choice = choose_broker()
    assert choice.kind == "kafka"
    assert "Java found" in choice.reason


@needs_java
@pytest.mark.integration
async def test_apache_kafka_is_durable_across_a_restart_and_a_kill() -> None:
    root = Path(tempfile.mkdtemp(prefix="omni-kafka-test-", dir=_scratch()))
    broker = ApacheKafkaBroker(free_port(), data_dir=root, log_path=root / "kafka.log")
    started = time.monotonic()
    broker.start()
    first_start = time.monotonic() - started
    try:
        assert kafka_jars_ready()
        assert (broker.log_dir / "meta.properties").exists()
        options = await producer_options(broker.bootstrap_servers)
        assert (options.acks, options.enable_idempotence) == ("all", True)
        assert options.max_request_size == PRODUCER_MAX_REQUEST_SIZE
        [topic, _] = await create_topics(broker.bootstrap_servers, "d.", ["store.sales.v1"])
        await _produce(broker.bootstrap_servers, topic, [b"a", b"b"])

        with pytest.raises(PortInUseError, match="already in use"):
            ApacheKafkaBroker(broker.port, data_dir=root / "other").start()

        broker.stop()  # a clean shutdown...
        assert broker.pid is None
        broker.start()  # ...and the same log directory again: no new format
        await _produce(broker.bootstrap_servers, topic, [b"c"])
        broker.kill()  # a crash
        broker.start()
        async with TopicReader(broker.bootstrap_servers, topic, fetch_max_wait_ms=100) as reader:
            records = await reader.collect(4, timeout=15)
        assert sorted(r.value for r in records) == [b"a", b"b", b"c"]
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"Apache Kafka {kafka_version()} first start (format included): {first_start:.1f}s")


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"store-1")
    finally:
        await producer.stop()


def _scratch() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
