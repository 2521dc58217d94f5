"""Real service processes for chaos tests: started, sent signals, started again.

A scenario that kills or restarts a service must do it to a process, as Kubernetes does to
a pod: in-process stand-ins cannot be killed -9, and their SIGTERM path is not the one
``omni-service`` (:mod:`omni_common.run`) runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from omni_common.settings import ServiceSettings
from pydantic import SecretStr

from omni_devkit.devstack.process import free_port, stop_process, tail


def settings_env(settings: ServiceSettings) -> dict[str, str]:
    """The environment variables that make ``ServiceSettings()`` equal ``settings``.

    For a child process that must run with a test's settings (its prefix, database, short
    group timings), secrets included.
    """
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[name.upper()] = str(value)
    return env


@dataclass
class ServiceProcess:
    """One service run as ``python -m omni_common.run NAME`` (what the image runs)."""

    name: str
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: IO[bytes] | None = None
    _log_offset: int = 0

    @property
    def url(self) -> str:
        """Base URL of its HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Base URL of its metrics port (``/metrics``)."""
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self) -> None:
        """Start the process (its output is appended to ``log_path``)."""
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.flush()
        self._log_offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "omni_common.run", self.name],
            env=dict(os.environ)
            | self.env
            | {
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(self.port),
                "METRICS_PORT": str(self.metrics_port),
                "PYTHONUNBUFFERED": "1",
            },
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1

    async def wait_ready(self, timeout: float = 60.0) -> float:  # noqa: ASYNC109
        """Wait until ``GET /readyz`` answers 200; returns the seconds it took."""
        assert self.proc is not None
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with code {self.proc.returncode}:\n"
                        + "\n".join(tail(self.log_path, 30))
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise TimeoutError(
                        f"{self.name} not ready within {timeout:g}s:\n"
                        + "\n".join(tail(self.log_path, 30))
                    )
                await asyncio.sleep(0.1)

    async def terminate(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """Send SIGTERM and wait for the exit; returns the exit code (-9: it did not stop
        within ``timeout`` and was killed)."""
        assert self.proc is not None
        return await asyncio.to_thread(stop_process, self.proc, timeout, signal.SIGTERM)

    def log_since_start(self) -> str:
        """What the process logged since its latest start."""
        with self.log_path.open("rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode(errors="replace")

    def stopped_cleanly(self, code: int) -> bool:
        """Whether exit ``code`` and the log tell of a clean stop: the lifespan's shutdown ran
        to its end, and the process exited 0 (``omni_common.run.ServiceServer``)."""
        return code == 0 and ("Application shutdown complete" in self.log_since_start())

    def kill(self) -> None:
        """Stop at once, whatever it is doing (cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        """Kill if still running and close the log."""
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


def service_processes(
    names: list[str], base: ServiceSettings, log_dir: Path, extra: Mapping[str, str] = {}
) -> dict[str, ServiceProcess]:
    """One (not yet started) :class:`ServiceProcess` per name, each with ``base``'s settings
    under its own service name (and so its own schema and consumer groups)."""
    env = settings_env(base) | dict(extra)
    env.pop("DB_SCHEMA", None)
    return {
        name: ServiceProcess(name, env | {"SERVICE_NAME": name}, log_dir / f"{name}.log")
        for name in names
    }
