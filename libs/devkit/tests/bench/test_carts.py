"""``omni bench carts``'s two phases at a tiny scale (the service phase runs it as a process)."""

from __future__ import annotations

import pytest
from omni_devkit.bench.carts import _baseline, _service_phase
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


async def test_the_service_phase_abandons_every_seeded_cart(
    kafka_bootstrap: str, postgres_url: str
) -> None:
    # The service runs as its own process; a probe cart through cart.events.v1 tells the
    # bench which timer to seed, so a change in how the service arms it shows here.
    phase, extra = await _service_phase(
        kafka_bootstrap, postgres_url, 50, 1.0, 2.0, say=lambda _: None
    )
    figures = phase.figures()
    assert figures["seen"] == figures["expected"] == 50
    assert extra["service_peak_rss_mib"] > 0 and extra["schema_mib_end"] > 0
