"""``omni bench ... --report DIR``: a benchmark's latencies as a picture and as JSON.

The PNG shows each measured distribution against its baseline measured in the same run
(histogram on a log scale, and the percentile curve with p50/p99 marked), so a result can be
seen, not only read. The JSON holds the figures and the raw samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank), NaN without samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def write_report(
    directory: Path,
    name: str,
    figures: Mapping[str, Any],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    unit: str = "ms",
) -> tuple[Path, Path]:
    """Write ``<name>.png`` and ``<name>.json`` into ``directory``; returns both paths.

    ``series`` maps a label to its latency samples; the first is the measured one, the
    others are baselines from the same run.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    png, doc = directory / f"{name}.png", directory / f"{name}.json"
    doc.write_text(
        json.dumps(
            {
                "benchmark": name,
                "title": title,
                "unit": unit,
                "figures": dict(figures),
                "series": {
                    label: {
                        "count": len(values),
                        "p50": percentile(values, 0.5),
                        "p90": percentile(values, 0.9),
                        "p99": percentile(values, 0.99),
                        "max": max(values) if values else float("nan"),
                        "samples": [round(v, 3) for v in values],
                    }
                    for label, values in series.items()
                },
            },
            indent=2,
        )
    )

    fig, (hist, curve) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    present = {label: values for label, values in series.items() if values}
    if present:
        low = max(min(min(v) for v in present.values()), 0.05)
        high = max(max(v) for v in present.values()) * 1.05
        bins = [low * (high / low) ** (i / 60) for i in range(61)] if high > low else 30
        colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
        for (label, values), colour in zip(present.items(), colours, strict=False):
            # Weighted to shares: a baseline with fewer samples stays visible beside it.
            hist.hist(
                values,
                bins=bins,
                alpha=0.55,
                label=label,
                color=colour,
                weights=[1 / len(values)] * len(values),
            )
            ordered = sorted(values)
            ranks = [100 * (i + 1) / len(ordered) for i in range(len(ordered))]
            curve.plot(ranks, ordered, label=label, color=colour)
            for q in (0.5, 0.99):
                value = percentile(values, q)
                curve.scatter([100 * q], [value], color=colour, zorder=3)
                curve.annotate(
                    f"p{int(q * 100)} {value:.1f}",
                    (100 * q, value),
                    textcoords="offset points",
                    xytext=(-60, 6),
                    fontsize=8,
                    color=colour,
                )
        hist.set_xscale("log")
        curve.set_yscale("log")
    hist.set_xlabel(f"latency ({unit}, log scale)")
    hist.set_ylabel("share of samples")
    hist.set_title("distribution")
    hist.legend(fontsize=8)
    curve.set_xlabel("percentile")
    curve.set_ylabel(f"latency ({unit}, log scale)")
    curve.set_title("percentiles")
    curve.grid(True, which="both", alpha=0.3)
    curve.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png, doc
