"""The pytest plugin's omni_env: isolated topics and database per test, and TopicReader."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from omni_devkit.testing.plugin import OmniTestEnv

# Also run on Tansu in CI: the zero-install path stays proven.
pytestmark = [pytest.mark.integration, pytest.mark.tansu]


async def test_omni_env_gives_a_prefix_topics_a_database_and_settings(
    omni_env: OmniTestEnv,
) -> None:
    assert omni_env.prefix.startswith("t") and omni_env.prefix.endswith(".")
    assert omni_env.topic("store.sales.v1") == f"{omni_env.prefix}store.sales.v1"

    settings = omni_env.settings("inventory", db_pool_max=3)
    assert settings.service_name == "inventory"
    assert settings.topic("store.sales.v1") == omni_env.topic("store.sales.v1")
    assert settings.kafka_bootstrap_servers == omni_env.bootstrap
    assert settings.db_pool_max == 3
    assert settings.api_key_map["test-key"] == "test"
    assert settings.api_key_table["test-key"].scopes == {"admin"}
    assert settings.api_key_map["test-web-key"] == "web"

    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        assert await conn.fetchval("SELECT current_database()") == omni_env.database
        # A fresh database: no tables of other tests.
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        )
    finally:
        await conn.close()


async def test_topic_reader_next_collect_and_predicates(omni_env: OmniTestEnv) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=omni_env.bootstrap)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(
                omni_env.topic("inventory.availability.v1"), f"v{i}".encode(), key=b"SKU-1"
            )
    finally:
        await producer.stop()
    async with omni_env.reader("inventory.availability.v1") as reader:
        third = await reader.next(lambda r: r.value == b"v2", timeout=10)
        assert third.value == b"v2"
        # Records skipped by the predicate are still there, in order.
        rest = await reader.collect(10, timeout=1)
        assert [r.value for r in rest] == [b"v0", b"v1", b"v3", b"v4"]
        assert await reader.collect(1, timeout=0.2) == []
        with pytest.raises(TimeoutError):  # NoRecordError is also an AssertionError
            await reader.next(timeout=0.2)


async def test_each_test_gets_its_own_world(omni_env: OmniTestEnv) -> None:
    # The topic the previous test wrote to is empty under this test's prefix.
    async with omni_env.reader("inventory.availability.v1") as reader:
        assert await reader.collect(1, timeout=0.3) == []
