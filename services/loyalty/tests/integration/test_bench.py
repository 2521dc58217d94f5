"""``omni bench loyalty`` end to end, at a tiny scale, against in-process services."""

from __future__ import annotations

import pytest
from loyalty_service.entrypoints.bench import BenchWorld, measure

pytestmark = pytest.mark.integration


async def test_the_loyalty_bench_measures_the_ledger_and_both_checkout_phases(omni_env) -> None:
    world = BenchWorld(omni_env.bootstrap, omni_env.server_url, omni_env.prefix)
    figures = await measure(world, entries=30, checkouts=10, say=lambda _: None)
    assert figures["entries"] == 30 and figures["checkouts"] == 10
    assert figures["ledger_entries_per_s"] > 0 and figures["raw_consume_per_s"] > 0
    assert figures["checkouts_per_s_with_loyalty"] > 0
    assert figures["checkouts_per_s_without_loyalty"] > 0
    # Every checkout of both phases was confirmed: stock and points were there.
    assert figures["confirmed_with_loyalty"] == figures["confirmed_without_loyalty"] == 10
