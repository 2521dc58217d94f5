"""DevStack in-process (as e2e tests can use it): up, dev.env, pid file, stop."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from omni_devkit.devstack.process import DevStackError, pid_alive, port_is_free
from omni_devkit.devstack.stack import DevStack, DevStackConfig, read_kv_file, read_pids

pytestmark = pytest.mark.integration

STANDIN = "omni_devkit.testing.standin:create_app"


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="omni-stack-"))
    yield path
    DevStack.down(DevStackConfig(state_dir=path), echo=lambda _: None)
    shutil.rmtree(path, ignore_errors=True)


def test_devstack_runs_and_stops_in_process(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNI_SERVICES", f"inventory={STANDIN}")
    config = DevStackConfig.with_free_ports(state_dir, fast_postgres=True)
    lines: list[str] = []
    with DevStack(config, echo=lines.append) as stack:
        env = read_kv_file(config.env_file)
        assert env["INVENTORY_URL"] == f"http://127.0.0.1:{config.http_base_port}"
        assert httpx.get(env["INVENTORY_URL"] + "/readyz", timeout=5).status_code == 200
        # Metrics on a port of their own, below the ephemeral range like the API's.
        metrics_url = f"http://127.0.0.1:{config.metrics_base_port}"
        assert env["INVENTORY_METRICS_URL"] == metrics_url
        assert config.metrics_base_port < 32768
        scraped = httpx.get(metrics_url + "/metrics", timeout=5)
        assert scraped.status_code == 200 and "omni_ready" in scraped.text
        assert httpx.get(env["INVENTORY_URL"] + "/metrics", timeout=5).status_code == 404
        pids = read_pids(config)
        assert set(pids) == {"supervisor", "postgres", "kafka", "inventory", "console"}
        assert all(pid_alive(pid) for pid in pids.values())
        assert any("inventory ready" in line for line in lines)
        # The console: one more port, in dev.env and in the summary.
        assert env["CONSOLE_URL"] == f"http://127.0.0.1:{config.console_port}"
        assert httpx.get(env["CONSOLE_URL"] + "/readyz", timeout=5).status_code == 200
        assert any(env["CONSOLE_URL"] in line for line in stack.summary())
        # A second stack on the same state dir refuses to start, before starting anything.
        with pytest.raises(DevStackError, match="already running"):
            DevStack(config).check_can_start()
        assert stack.summary()[0] == "omni dev stack is up"
    assert not config.env_file.exists() and not config.pid_file.exists()
    assert not any(pid_alive(pid) for name, pid in pids.items() if name != "supervisor")
    assert port_is_free("127.0.0.1", config.kafka_port)
    assert port_is_free("127.0.0.1", config.pg_port)
    assert port_is_free("127.0.0.1", config.console_port)
    assert port_is_free("127.0.0.1", config.metrics_base_port)


def test_a_service_that_cannot_start_stops_everything(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNI_SERVICES", "order=no_such_module.app:create_app")
    config = DevStackConfig.with_free_ports(state_dir, fast_postgres=True)
    lines: list[str] = []
    with pytest.raises(DevStackError, match="service order exited with code 1"):
        DevStack(config, echo=lines.append).up()
    assert any("no_such_module" in line for line in lines)  # the log tail was shown
    assert not config.pid_file.exists()
    assert port_is_free("127.0.0.1", config.kafka_port)
    assert port_is_free("127.0.0.1", config.pg_port)


def test_the_dev_stack_runs_an_smtp_server_into_a_maildir_and_makes_vapid_keys(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailbox
    import smtplib
    from email.message import EmailMessage
    from urllib.parse import urlsplit

    from cryptography.hazmat.primitives import serialization
    from omni_devkit.devstack.vapid import public_key_of

    monkeypatch.setenv("OMNI_SERVICES", f"notification={STANDIN}")
    config = DevStackConfig.with_free_ports(state_dir, fast_postgres=True)
    with DevStack(config, echo=lambda _: None):
        env = read_kv_file(config.env_file)
        smtp = urlsplit(env["SMTP_URL"])
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.com", "hi"
        message.set_content("hello")
        with smtplib.SMTP(smtp.hostname, smtp.port, timeout=5) as client:
            client.send_message(message)
        (stored,) = list(mailbox.Maildir(env["MAILDIR"], create=False))
        assert stored["Subject"] == "hi"
        key = serialization.load_pem_private_key(
            Path(env["VAPID_PRIVATE_KEY_FILE"]).read_bytes(), password=None
        )
        assert public_key_of(key) == env["VAPID_PUBLIC_KEY"]  # type: ignore[arg-type]
    # The key pair survives a restart: browsers subscribed with it keep receiving pushes.
    with DevStack(config, echo=lambda _: None):
        assert read_kv_file(config.env_file)["VAPID_PUBLIC_KEY"] == env["VAPID_PUBLIC_KEY"]
