"""``omni bench stream`` end to end, at a tiny scale, against inventory behind a real HTTP
server (the bench's SSE clients are raw sockets)."""

from __future__ import annotations

import pytest
from inventory_service.entrypoints.app import create_app
from inventory_service.settings import InventorySettings
from omni_devkit.bench.kit import StackTarget
from omni_devkit.bench.stream import measure
from omni_devkit.testing.services import served

pytestmark = pytest.mark.integration


async def test_the_stream_bench_times_every_client_beside_a_kafka_consumer(omni_env) -> None:
    settings = InventorySettings.from_settings(omni_env.settings("inventory"))
    async with served(create_app(settings)) as url:
        result = await measure(
            StackTarget(omni_env.bootstrap, {"inventory": url}, "test-key", omni_env.prefix),
            clients=20,
            rate=5,
            duration=1,
            warmup=0.2,
            skus=2,
            say=lambda line: None,
        )
    figures = result.as_json()
    assert figures["connected"] == 20
    assert figures["deliveries"] == figures["expected_deliveries"] == 20 * 5
    assert len(result.kafka.samples) == 5
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert 0 < figures["kafka_p50_ms"] <= figures["kafka_p99_ms"]
