"""The benchmark's arithmetic (no broker needed)."""

from __future__ import annotations

import json
import math

from omni_devkit.bench.kit import Latencies
from omni_devkit.bench.propagation import PropagationResult


def test_percentiles_use_the_nearest_rank() -> None:
    latencies = Latencies([float(n) for n in range(100, 0, -1)], sent=100)
    assert latencies.percentile(0.50) == 50.0
    assert latencies.percentile(0.99) == 99.0
    assert latencies.percentile(1.0) == 100.0
    assert Latencies([7.0], sent=1).percentile(0.99) == 7.0
    assert math.isnan(Latencies([], sent=3).percentile(0.5))


def test_json_line_has_exactly_the_issue_fields() -> None:
    result = PropagationResult(
        rate=200.0,
        service=Latencies([10.0, 12.0, 30.0], sent=4),
        raw=Latencies([5.0, 6.0, 8.0], sent=3),
    )
    line = json.dumps(result.as_json())
    assert json.loads(line) == {
        "rate": 200.0,
        "events": 3,
        "p50_ms": 12.0,
        "p99_ms": 30.0,
        "raw_p50_ms": 6.0,
        "raw_p99_ms": 8.0,
    }
