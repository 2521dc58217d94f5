"""``omni bench propagation`` end to end, at a tiny scale, against an in-process inventory."""

from __future__ import annotations

import httpx
import pytest
from inventory_service.entrypoints.app import create_app
from inventory_service.settings import InventorySettings
from omni_devkit.bench.kit import StackTarget
from omni_devkit.bench.propagation import measure
from omni_devkit.testing.services import running

pytestmark = pytest.mark.integration


async def test_the_propagation_bench_measures_both_paths(omni_env) -> None:
    settings = InventorySettings.from_settings(omni_env.settings("inventory"))
    async with running(create_app(settings)) as inventory:
        target = StackTarget(
            bootstrap=omni_env.bootstrap,
            urls={"inventory": "http://inventory"},
            api_key="test-key",
            topic_prefix=omni_env.prefix,
        )
        result = await measure(
            target,
            rate=50,
            duration=1,
            warmup=0.2,
            stores=2,
            skus=2,
            say=lambda _: None,
            http_transport=httpx.ASGITransport(app=inventory.app),
        )
    figures = result.as_json()
    assert set(figures) == {"rate", "events", "p50_ms", "p99_ms", "raw_p50_ms", "raw_p99_ms"}
    assert figures["events"] == result.service.sent == 50
    assert len(result.raw.samples) == 50
    assert 0 < figures["raw_p50_ms"] <= figures["raw_p99_ms"]
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
