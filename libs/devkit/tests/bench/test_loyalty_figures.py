"""The loyalty bench's figures, from its raw measurements."""

from __future__ import annotations

from omni_devkit.bench.loyalty import LoyaltyResult


def test_rates_and_the_saga_cost_ratio_come_from_the_measured_times() -> None:
    result = LoyaltyResult(
        entries=1000,
        ledger_seconds=4.0,
        raw_messages_per_s=15000.0,
        checkouts=300,
        without_seconds=3.0,
        with_seconds=4.0,
        confirmed_without=300,
        confirmed_with=299,
    )
    figures = result.as_json()
    assert figures["ledger_entries_per_s"] == 250.0
    assert figures["checkouts_per_s_without_loyalty"] == 100.0
    assert figures["checkouts_per_s_with_loyalty"] == 75.0
    assert figures["saga_cost_ratio"] == 0.75
    assert figures["confirmed_with_loyalty"] == 299


def test_a_phase_that_took_no_time_reports_zero_not_a_division_error() -> None:
    figures = LoyaltyResult(10, 1.0, 1.0, 10, 0.0, 0.0, 0, 0).as_json()
    assert figures["checkouts_per_s_with_loyalty"] == 0.0 and figures["saga_cost_ratio"] == 0.0
