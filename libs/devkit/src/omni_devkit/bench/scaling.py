"""``omni bench scaling``: does the checkout rate grow with the cores the stack may use?

Runs ``omni bench checkout``'s workload twice on the dev stack: once with every process of the
stack (the broker, PostgreSQL with its backends, each service, and this bench) confined to one
core, once to two (``taskset``, every thread), and prints both rates and their ratio. A
platform bound by one process, or by contention between them, does not scale; adding cores,
or pods, must add throughput.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Annotated, Any

import psutil
import typer

from omni_devkit.bench.kit import StackTarget, progress, run_on_stack
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError

TARGET_RATIO = 1.8


def _confine(pids: list[int], cores: set[int]) -> None:
    """Every thread of every process in ``pids`` (and of their children) on ``cores``."""
    mask = ",".join(str(c) for c in sorted(cores))
    family: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            family.add(pid)
            family.update(child.pid for child in process.children(recursive=True))
    for pid in sorted(family):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", mask, str(pid)],
            capture_output=True,
            check=False,
        )


@contextlib.contextmanager
def confined(target: StackTarget, cores: set[int]) -> Iterator[None]:
    """The stack and this process on ``cores`` while the block runs; all cores after."""
    everything = set(range(os.cpu_count() or 1))
    pids = [*target.pids.values(), os.getpid()]
    _confine(pids, cores)
    try:
        yield
    finally:
        _confine(pids, everything)


async def measure(target: StackTarget, *, checkouts: int, skus: int, say: Any) -> dict[str, float]:
    """Checkouts per second on one core, then on two."""
    from omni_devkit.bench.checkout import measure as checkout

    if not target.pids:
        raise DevStackError("scaling needs the stack's processes (run it on the dev stack)")
    if (os.cpu_count() or 1) < 2:
        raise DevStackError("scaling needs a machine with two cores at least")
    rates: dict[str, float] = {}
    for cores in ({0}, {0, 1}):
        say(f"scaling: {checkouts} checkouts with the stack on {len(cores)} core(s) ...")
        with confined(target, cores):
            result = await checkout(target, checkouts=checkouts, skus=skus, say=say, floor=False)
        rates[f"checkouts_per_s_{len(cores)}_cores"] = round(result.checkouts / result.seconds, 1)
    one, two = rates["checkouts_per_s_1_cores"], rates["checkouts_per_s_2_cores"]
    rates["ratio"] = round(two / one, 2) if one else 0.0
    return rates


@bench_app.command("scaling")
def scaling(
    checkouts: Annotated[int, typer.Option(min=1, help="Checkouts per run")] = 2000,
    skus: Annotated[int, typer.Option(min=1, help="SKUs the checkouts spread over")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line")] = False,
) -> None:
    """Checkout rate with the stack confined to 1 core, then 2 (taskset); target ratio >= 1.8."""
    from omni_devkit.bench.checkout import SERVICES

    say = progress(as_json)
    figures = run_on_stack(
        SERVICES,
        lambda target: measure(target, checkouts=checkouts, skus=skus, say=say),
        embedded=False,
        say=say,
    )
    if as_json:
        typer.echo(json.dumps(figures))
    else:
        typer.echo(
            f"scaling: {figures['checkouts_per_s_1_cores']} checkouts/s on 1 core,"
            f" {figures['checkouts_per_s_2_cores']} on 2: {figures['ratio']}x"
            f" (target >= {TARGET_RATIO}x)"
        )
    if not figures.get("ratio"):
        fail("no rate measured")
