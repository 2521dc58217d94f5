"""``omni bench carts``'s baseline phase at a tiny scale (the service phase runs a process)."""

from __future__ import annotations

import pytest
from omni_devkit.bench.carts import _baseline
from omni_devkit.devstack.postgres import create_database, drop_database

pytestmark = pytest.mark.integration


async def test_the_baseline_fires_every_timer_near_its_deadline(postgres_url: str) -> None:
    database = await create_database(postgres_url, "benchcartsbase")
    try:
        phase = await _baseline(database, 200, 1.0, 0.5, say=lambda _: None)
    finally:
        await drop_database(postgres_url, "benchcartsbase")
    figures = phase.figures()
    assert figures["seen"] == figures["expected"] == 200
    assert 0 <= figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"] < 5000
    assert figures["rate_per_s"] > 0
