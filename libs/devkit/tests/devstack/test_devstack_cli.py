"""The ``omni`` CLI: one-line errors, benchmarks, and the dev stack end to end."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from omni_common.auth import parse_api_keys
from omni_devkit.cli import app, bench_app
from omni_devkit.devstack.process import free_port, free_port_range, port_is_free
from omni_devkit.devstack.stack import DEFAULT_SERVICE_ORDER, discover_services, read_kv_file
from typer.testing import CliRunner

STANDIN = "omni_devkit.testing.standin:create_app"


def omni(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``main()``, with its error handling) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "omni_devkit.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_unknown_service_is_a_one_line_error() -> None:
    result = omni("run", "no-such-service")
    assert result.returncode == 1
    known = ", ".join(discover_services())
    assert result.stderr.strip().splitlines() == [
        f"error: unknown service 'no-such-service'; known services: {known}"
    ]


def test_unreachable_broker_is_a_one_line_error() -> None:
    port = free_port()
    result = omni(
        "topics", "create", "--timeout", "0.5", env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: Kafka broker at 127.0.0.1:{port} did not answer")


def test_benchmarks_registered_by_packages_are_listed() -> None:
    result = omni("bench", "list")
    assert result.returncode == 0, result.stderr
    assert "outbox" in result.stdout  # omni_common's own, via the omni.bench entry point
    assert "propagation" in result.stdout  # the inventory service's


def test_bench_all_runs_every_registered_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the fake one: the real benchmarks run in `make bench`, not in the test suite.
    monkeypatch.setattr("omni_devkit.cli.load_bench_plugins", lambda: None)
    # Benchmarks other tests imported (their modules register on import) are set aside too.
    registered = list(bench_app.registered_commands)
    bench_app.registered_commands[:] = [c for c in registered if c.name in ("all", "list")]
    ran: list[str] = []

    @bench_app.command("fake-one")
    def fake_one(size: int = 3) -> None:
        """A fake benchmark."""
        ran.append(f"one:{size}")

    try:
        result = CliRunner().invoke(app, ["bench", "all"])
        assert result.exit_code == 0, result.output
        assert ran == ["one:3"]
        assert "== omni bench fake-one" in result.output
        listed = CliRunner().invoke(app, ["bench", "list"])
        assert "fake-one" in listed.output
    finally:
        bench_app.registered_commands[:] = registered


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="omni-state-"))
    yield path
    omni("dev", "down", "--state-dir", str(path))  # whatever happened, leave nothing running
    shutil.rmtree(path, ignore_errors=True)


def _up_status_down(
    state_dir: Path, services: list[str], env: dict[str, str], real: bool = False
) -> None:
    n = len(DEFAULT_SERVICE_ORDER) + 2
    # One range for the API ports and the metrics ports: two picked apart could overlap.
    kafka, pg, base = free_port(), free_port(), free_port_range("127.0.0.1", 2 * n)
    ports = ["--kafka-port", str(kafka), "--pg-port", str(pg), "--http-base-port", str(base)]
    ports += ["--metrics-base-port", str(base + n)]
    where = ["--state-dir", str(state_dir)]
    # The console's own port too: a developer's stack may hold the default one.
    env = {**env, "OMNI_CONSOLE_PORT": str(free_port())}

    up = omni("dev", "up", "--detach", *where, *ports, env=env, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "omni dev stack is up" in up.stdout

    dev_env = read_kv_file(state_dir / "dev.env")
    assert dev_env["KAFKA_BOOTSTRAP_SERVERS"] == f"127.0.0.1:{kafka}"
    assert dev_env["DATABASE_URL"] == f"postgresql://postgres@127.0.0.1:{pg}/omni"
    assert {"API_KEY", "API_KEYS"} <= dev_env.keys()
    keys = parse_api_keys(dev_env["API_KEYS"])
    assert {k.channel for k in keys.values()} == {"web", "app", "pos", "call_center", "ops"}
    scopes = {k.channel: k.scopes for k in keys.values()}
    assert scopes["ops"] == {"admin"} and "shopper" in scopes["web"]
    assert "locations.write" not in scopes["pos"]
    # omni dev token mints what the running services accept.
    token = omni("dev", "token", "c-42", *where, env=env)
    assert token.returncode == 0, token.stderr
    order_url = dev_env.get("ORDER_URL")
    if real and order_url:
        mine = httpx.get(
            f"{order_url}/customers/c-42/orders",
            headers={
                "Authorization": f"Bearer {dev_env['API_KEY_WEB']}",
                "X-Shopper-Token": token.stdout.strip(),
            },
            timeout=5,
        )
        assert mine.status_code == 200, mine.text
    for name in services:
        url = dev_env[name.upper().replace("-", "_") + "_URL"]
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        metrics_url = dev_env[name.upper().replace("-", "_") + "_METRICS_URL"]
        assert int(metrics_url.rsplit(":", 1)[1]) in range(base + n, base + 2 * n)
        assert httpx.get(f"{metrics_url}/metrics", timeout=5).status_code == 200

    again = omni("dev", "up", "--detach", *where, *ports, env=env)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [again.stderr.strip()]
    assert "already running" in again.stderr and "omni dev down" in again.stderr

    status = omni("dev", "status", *where, env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("supervisor", "postgres", "kafka", *services):
        assert name in status.stdout

    down = omni("dev", "down", *where, env=env)
    assert down.returncode == 0, down.stderr
    assert not (state_dir / "dev.env").exists()
    assert not (state_dir / "dev.pid").exists()
    assert port_is_free("127.0.0.1", kafka) and port_is_free("127.0.0.1", pg)
    assert omni("dev", "status", *where, env=env).returncode == 1


@pytest.mark.integration
def test_dev_stack_up_status_down_with_stand_in_services(state_dir: Path) -> None:
    env = {"OMNI_SERVICES": f"order={STANDIN},inventory={STANDIN}"}
    _up_status_down(state_dir, ["order", "inventory"], env)


def _missing_apps() -> list[str]:
    missing = []
    for name, target in discover_services().items():
        module = target.partition(":")[0]
        if importlib.util.find_spec(module.rpartition(".")[0]) is None or (
            importlib.util.find_spec(module) is None
        ):
            missing.append(name)
    return missing


@pytest.mark.e2e
def test_dev_stack_up_status_down_with_every_service(state_dir: Path) -> None:
    if missing := _missing_apps():
        pytest.skip(f"service apps not written yet: {', '.join(missing)}")
    # Generous: several services joining consumer groups on a busy 2-core machine.
    env = {"OMNI_SERVICES": "", "OMNI_READY_TIMEOUT": "170"}
    _up_status_down(state_dir, list(discover_services()), env, real=True)
