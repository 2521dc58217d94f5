"""The carts bench's figures from raw lags (no I/O)."""

from __future__ import annotations

from omni_devkit.bench.carts import Phase


def test_figures_of_a_phase() -> None:
    lags = [0.01 * n for n in range(1, 101)]  # 10 ms .. 1 s
    figures = Phase(lags, expected=120, first_due=1000.0, last_seen=1010.0).figures()
    assert figures["seen"] == 100 and figures["expected"] == 120
    assert figures["p50_ms"] == 510.0 and figures["p99_ms"] == 990.0 and figures["max_ms"] == 1000.0
    assert figures["within_1s"] == 1.0
    assert figures["rate_per_s"] == 10.0


def test_figures_of_an_empty_phase_are_not_a_crash() -> None:
    figures = Phase([], expected=5, first_due=0.0, last_seen=0.0).figures()
    assert figures["seen"] == 0 and figures["within_1s"] == 0.0
