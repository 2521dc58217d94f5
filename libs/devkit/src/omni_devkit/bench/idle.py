"""``omni bench idle``: what the whole stack burns when nothing happens.

Samples the CPU time of every process of the stack (the broker, PostgreSQL with all its
backends, each service) over a quiet window, and reports it as a share of one core, per
component and in total, beside the share of the broker and database (what the services'
polling costs them shows up there: empty fetches, relay and timer queries).

Runs against the dev stack when one is up (``omni dev up``), else starts a private one with
every service, as ``make run`` does.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import psutil
import typer

from omni_devkit.bench.kit import cpu_seconds, progress
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError

TARGET_SHARE = 0.05  # of one core, the target for the whole stack idle
# Apache Kafka's JIT still compiles for about this long after a start (measured: about 2 %
# of a core more in the first minute); a window before it measures the start, not idle.
WARM_UP_S = 120.0
INFRASTRUCTURE = ("kafka", "postgres")


@dataclass(frozen=True)
class IdleResult:
    """CPU share of one core per component over the window."""

    seconds: float
    shares: dict[str, float]
    # How long the oldest process of the stack had been running when the window opened.
    stack_age_s: float = 0.0

    @property
    def total(self) -> float:
        """The whole stack."""
        return sum(self.shares.values())

    @property
    def infrastructure(self) -> float:
        """Broker and database alone: the baseline."""
        return sum(v for k, v in self.shares.items() if k in INFRASTRUCTURE)

    def as_json(self) -> dict[str, object]:
        """The figures as one JSON object (percent of one core)."""
        return {
            "seconds": round(self.seconds, 1),
            "stack_age_s": round(self.stack_age_s, 1),
            "total_pct": round(100 * self.total, 2),
            "baseline_infrastructure_pct": round(100 * self.infrastructure, 2),
            "services_pct": round(100 * (self.total - self.infrastructure), 2),
            "target_pct": 100 * TARGET_SHARE,
            "per_component_pct": {k: round(100 * v, 2) for k, v in sorted(self.shares.items())},
        }


def measure_idle(pids: dict[str, int], seconds: float) -> IdleResult:
    """CPU share of one core of each named process tree over ``seconds``."""
    processes = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            processes[name] = psutil.Process(pid)
    if not processes:
        raise DevStackError("none of the stack's processes is running")
    before = {name: cpu_seconds(p.pid) for name, p in processes.items()}
    age = 0.0
    with contextlib.suppress(psutil.Error):
        age = time.time() - min(p.create_time() for p in processes.values())
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return IdleResult(
        elapsed,
        {
            name: max(0.0, cpu_seconds(p.pid) - before[name]) / elapsed
            for name, p in processes.items()
        },
        age,
    )


def _stack_pids(state_dir: Path | None) -> dict[str, int] | None:
    """The running dev stack's processes (not the supervisor), or None."""
    from omni_devkit.devstack.stack import DevStackConfig, read_pids

    config = DevStackConfig.from_env(state_dir=state_dir)
    pids = {k: v for k, v in read_pids(config).items() if k != "supervisor"}
    return pids if pids and all(psutil.pid_exists(p) for p in pids.values()) else None


@contextlib.contextmanager
def _private_stack(say: Callable[[str], None]) -> Iterator[dict[str, int]]:
    """Every service with its broker and database, in a temp dir, as ``make run`` starts it."""
    from omni_devkit.devstack.stack import DevStack, DevStackConfig, read_pids

    with tempfile.TemporaryDirectory(prefix="omni-bench-idle-") as state:
        config = DevStackConfig.with_free_ports(Path(state))
        stack = DevStack(config, echo=say)
        stack.up()
        try:
            yield {k: v for k, v in read_pids(config).items() if k != "supervisor"}
        finally:
            stack.stop(quiet=True)


@bench_app.command("idle")
def idle(
    seconds: Annotated[float, typer.Option(min=1, help="Seconds measured")] = 30.0,
    settle: Annotated[float, typer.Option(min=0, help="Seconds waited before measuring")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line")] = False,
    state_dir: Annotated[
        Path | None, typer.Option(help="Dev stack state dir [default: .omni]")
    ] = None,
) -> None:
    """CPU of the whole idle stack (broker and database included); target < 5 % of one core."""

    say = progress(as_json)

    def run(pids: dict[str, int]) -> IdleResult:
        say(f"settling {settle:g} s, then measuring {seconds:g} s of idle CPU ...")
        time.sleep(settle)
        return measure_idle(pids, seconds)

    try:
        pids = _stack_pids(state_dir)
        if pids is None:
            say("no dev stack running; starting a private one with every service")
            with _private_stack(say) as private:
                result = run(private)
        else:
            result = run(pids)
    except DevStackError as exc:
        fail(str(exc))
    figures = result.as_json()
    if as_json:
        typer.echo(json.dumps(figures))
        return
    parts = ", ".join(f"{k} {v:.2f} %" for k, v in figures["per_component_pct"].items())  # type: ignore[attr-defined]
    typer.echo(
        f"idle over {figures['seconds']} s: whole stack {figures['total_pct']} % of one core "
        f"(target < {figures['target_pct']:g} %); of which broker + database "
        f"{figures['baseline_infrastructure_pct']} %, service processes {figures['services_pct']} %"
    )
    typer.echo(f"  {parts}")
    if result.stack_age_s < WARM_UP_S:
        typer.echo(
            f"  note: the stack had been up {result.stack_age_s:.0f} s; the broker's JIT adds "
            f"CPU for about {WARM_UP_S:.0f} s after a start (--settle to wait it out)"
        )
