"""A child process started with :func:`settings_env` runs with the test's exact settings."""

from __future__ import annotations

import os

import pytest
from omni_common.settings import ServiceSettings
from omni_devkit.testing.processes import service_processes, settings_env


def test_settings_env_rebuilds_the_same_settings_secrets_included(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    settings = ServiceSettings(
        service_name="chaos",
        database_url="postgresql://postgres:s3cret@127.0.0.1:5/t1",
        topic_prefix="t1.",
        api_keys="ops:key-of-ops:admin",
        consumer_session_timeout_ms=2_000,
        log_json=False,
    )
    env = settings_env(settings)
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert ServiceSettings() == settings
    assert env["DATABASE_URL"] == "postgresql://postgres:s3cret@127.0.0.1:5/t1"
    assert env["LOG_JSON"] == "false"
    assert "DB_SCHEMA" not in env  # None: the service's own name decides


def test_each_service_process_gets_its_own_name_and_port(tmp_path) -> None:
    base = ServiceSettings(service_name="order", db_schema="shared")
    procs = service_processes(["order", "inventory"], base, tmp_path)
    assert {n: p.env["SERVICE_NAME"] for n, p in procs.items()} == {
        "order": "order",
        "inventory": "inventory",
    }
    assert all("DB_SCHEMA" not in p.env for p in procs.values())
    assert procs["order"].port != procs["inventory"].port
