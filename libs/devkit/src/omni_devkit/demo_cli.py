"""``omni demo [--start]``: find (or start) a stack, play the stories, exit non-zero on the
first that does not hold."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import typer

from omni_devkit.demo import DEMO_TIMERS, ORDER, STORIES, StoryFailed, play_all
from omni_devkit.devstack.process import DevStackError


def _say(line: str) -> None:
    typer.echo(line)
    sys.stdout.flush()


def run_demo(*, start: bool, stories: tuple[int, ...], state_dir: Path | None) -> int:
    """Play ``stories`` (default: all, in the demo's order); the process exit code."""
    from omni_devkit.devstack.stack import (
        DevStack,
        DevStackConfig,
        default_state_dir,
        read_kv_file,
    )

    unknown = [n for n in stories if n not in STORIES]
    if unknown:
        _say(f"error: no story {unknown[0]}; the stories are {', '.join(map(str, STORIES))}")
        return 2
    numbers = stories or ORDER

    def play(env: dict[str, str]) -> int:
        try:
            outcomes = asyncio.run(play_all(env, numbers, _say))
        except StoryFailed:
            return 1
        passed = sum(1 for o in outcomes.values() if o == "passed")
        skipped = [n for n, o in outcomes.items() if o == "skipped"]
        _say(
            f"{passed} stories held"
            + (f"; skipped: {', '.join(map(str, skipped))}" if skipped else "")
        )
        return 0

    if not start:
        env_file = (state_dir or default_state_dir()) / "dev.env"
        if not env_file.exists():
            _say(
                f"error: no running stack ({env_file} not found): run `make run` in another "
                "terminal, or `omni demo --start`"
            )
            return 2
        return play(read_kv_file(env_file))

    saved = {k: os.environ.get(k) for k in DEMO_TIMERS}
    os.environ.update(DEMO_TIMERS)
    try:
        with tempfile.TemporaryDirectory(prefix="omni-demo-") as state:
            config = DevStackConfig.with_free_ports(Path(state), fast_postgres=True)
            stack = DevStack(config, echo=_say)
            try:
                stack.up()
            except DevStackError as exc:
                _say(f"error: {exc}")
                return 2
            try:
                for line in stack.summary():
                    _say(line)
                return play(read_kv_file(config.env_file))
            finally:
                stack.stop(quiet=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
