"""``--report DIR``: the PNG and the JSON a benchmark writes."""

from __future__ import annotations

import json

from omni_devkit.report import percentile, write_report


def test_a_report_is_a_png_and_the_figures(tmp_path) -> None:
    measured = [float(v) for v in range(1, 101)]
    baseline = [v / 4 for v in measured[:40]]
    png, doc = write_report(
        tmp_path / "out",
        "stream",
        {"p50_ms": 50.0},
        {"measured": measured, "baseline": baseline, "nothing": []},
        title="a test",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    figures = json.loads(doc.read_text())
    assert figures["figures"] == {"p50_ms": 50.0}
    assert figures["series"]["measured"]["p99"] == 99.0
    assert figures["series"]["baseline"]["count"] == 40
    assert figures["series"]["nothing"]["count"] == 0


def test_percentile_is_the_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN
