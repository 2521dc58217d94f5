"""The broker's own counters: requests by kind and record bytes in and out per topic.

Read over JMX by attaching to the broker's JVM (``BrokerMetrics.java``, run by a JDK's source
launcher), so no JMX port is opened. Benchmarks use them to count the Kafka requests a unit
of work causes, and to check that consumers fetch each record once: the bytes the broker
sends to consumers, against the bytes produced times the groups that read them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("BrokerMetrics.java")


@dataclass
class BrokerCounters:
    """One reading of the broker's cumulative counters."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)
    bytes_out: dict[str, int] = field(default_factory=dict)

    def minus(self, before: BrokerCounters) -> BrokerCounters:
        """What was counted since ``before``."""

        def delta(now: dict[str, int], then: dict[str, int]) -> dict[str, int]:
            return {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0) > 0}

        return BrokerCounters(
            delta(self.requests, before.requests),
            delta(self.bytes_in, before.bytes_in),
            delta(self.bytes_out, before.bytes_out),
        )


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(home) / "bin" / "java")] if home else []
    if found := shutil.which("java"):
        candidates.append(found)
    return next((c for c in candidates if Path(c).exists()), None)


def read_counters(pid: int) -> BrokerCounters:
    """The broker's counters now; raises RuntimeError with the reason when unreadable (a JRE
    without ``jdk.attach`` and ``jdk.compiler``, another user's JVM)."""
    java = _java()
    if java is None:
        raise RuntimeError("no java to read the broker's metrics with")
    done = subprocess.run(
        [java, str(SOURCE), str(pid)], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"could not read the broker's metrics (needs a JDK): {last}")
    counters = BrokerCounters()
    for line in done.stdout.splitlines():
        kind, name, count = line.split("\t")
        into = {"request": counters.requests, "bytes_in": counters.bytes_in}.get(
            kind, counters.bytes_out
        )
        # One MBean per request version: summed per request kind.
        into[name] = into.get(name, 0) + int(float(count))
    return counters


class BrokerMeter:
    """The broker's counters between :meth:`start` and :meth:`stop` (None when unreadable)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.why_not = "" if pid else "the broker's process is unknown"
        self._before: BrokerCounters | None = None
        self.spent: BrokerCounters | None = None

    def _read(self) -> BrokerCounters | None:
        if not self.pid or self.why_not:
            return None
        try:
            return read_counters(self.pid)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self.why_not = str(exc)
            return None

    def start(self) -> BrokerMeter:
        """Take the first reading."""
        self._before = self._read()
        return self

    def stop(self) -> BrokerCounters | None:
        """Take the second reading; what the broker counted in between."""
        after = self._read()
        if after is not None and self._before is not None:
            self.spent = after.minus(self._before)
        return self.spent

    def requests_per_unit(self, units: int) -> dict[str, float]:
        """Requests of each kind per unit of work, most frequent first."""
        if self.spent is None:
            return {}
        ranked = sorted(self.spent.requests.items(), key=lambda kv: -kv[1])
        return {name: round(count / units, 2) for name, count in ranked if count / units >= 0.01}

    def fetched_vs_needed(self, readers: dict[str, int]) -> float | None:
        """Record bytes the broker sent to consumers over the bytes they had to fetch (each
        topic's bytes in times the groups reading it, from ``readers``): 1.0 when every record
        is fetched once per group, more when fetched records are thrown away and fetched
        again."""
        if self.spent is None:
            return None
        needed = sum(n * readers.get(topic, 0) for topic, n in self.spent.bytes_in.items())
        sent = sum(n for topic, n in self.spent.bytes_out.items() if topic in readers)
        return round(sent / needed, 3) if needed else None
