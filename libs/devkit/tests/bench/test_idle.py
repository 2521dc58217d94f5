"""``omni bench idle`` measures CPU per process tree and says how old the stack was."""

from __future__ import annotations

import subprocess
import sys
import time

from omni_devkit.bench.idle import measure_idle


def test_a_busy_process_shows_and_an_idle_one_does_not() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)  # both started (the interpreter's start-up is not in the window)
        result = measure_idle({"busy": busy.pid, "idle": idle.pid}, 1.0)
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
    assert result.shares["busy"] > 0.3, result.shares
    assert result.shares["idle"] < 0.05, result.shares
    assert result.total > result.shares["busy"] - 1e-9
    assert 0.3 <= result.stack_age_s < 30, result.stack_age_s
    figures = result.as_json()
    assert figures["stack_age_s"] == round(result.stack_age_s, 1)
    assert set(figures["per_component_pct"]) == {"busy", "idle"}  # type: ignore[arg-type]
