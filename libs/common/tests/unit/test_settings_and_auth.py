"""Settings from the environment and API-key authentication of service endpoints."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import APIRouter
from omni_common.http import Channel, create_http_app, serve_metrics
from omni_common.service import ServiceRuntime
from omni_common.settings import Misconfigured, ServiceSettings


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("TOPIC_PREFIX", "t1.")
    monkeypatch.setenv("API_KEYS", "web=key-one-1, pos = key-two-2")
    settings = ServiceSettings(service_name="customer-profile")
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.topic("store.sales.v1") == "t1.store.sales.v1"
    assert settings.group_id() == "t1.customer-profile.main"
    assert settings.schema == "customer_profile"
    assert settings.api_key_map == {"key-one-1": "web", "key-two-2": "pos"}
    assert "key-one-1" not in repr(settings)  # secrets never printed


def test_malformed_api_keys_are_refused_without_quoting_them() -> None:
    with pytest.raises(ValueError, match="CHANNEL=KEY") as refused:
        ServiceSettings(api_keys="justakey-secret")
    assert "justakey-secret" not in str(refused.value)


def _app(api_keys: str):
    runtime = ServiceRuntime(ServiceSettings(service_name="probe", api_keys=api_keys))
    router = APIRouter()

    @router.get("/whoami")
    async def whoami(channel: Channel) -> dict[str, str]:
        return {"channel": channel}

    return create_http_app(runtime, title="probe", routers=[router])


async def _get(app, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        return await client.get(path, headers=headers)


async def test_endpoints_need_a_valid_key() -> None:
    app = _app("web=secret-web,pos=secret-pos")  # the older form still works
    assert (await _get(app, "/whoami")).status_code == 401
    assert (await _get(app, "/whoami", "wrong")).status_code == 401
    response = await _get(app, "/whoami", "secret-pos")
    assert response.status_code == 200
    assert response.json() == {"channel": "pos"}


async def test_no_configured_keys_means_nothing_is_open() -> None:
    assert (await _get(_app(""), "/whoami", "")).status_code == 401
    assert (await _get(_app(""), "/whoami", "anything")).status_code == 401


async def test_probes_need_no_key() -> None:
    app = _app("")
    assert (await _get(app, "/healthz")).json() == {"status": "ok"}
    ready = await _get(app, "/readyz")
    assert ready.status_code == 503  # not started


async def test_the_api_port_serves_no_metrics_whatever_the_key() -> None:
    app = _app("ops:secret-ops:admin")
    assert (await _get(app, "/metrics")).status_code == 404
    assert (await _get(app, "/metrics", "secret-ops")).status_code == 404


async def test_metrics_are_served_on_their_own_port() -> None:
    app = _app("")
    await _get(app, "/whoami")
    registry = app.state.runtime.metrics.registry
    async with (
        serve_metrics(registry, "127.0.0.1", 0) as (host, port),
        httpx.AsyncClient(base_url=f"http://{host}:{port}") as client,
    ):
        response = await client.get("/metrics")
        elsewhere = await client.get("/whoami")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    metrics = response.text
    assert (
        'omni_http_requests_total{method="GET",route="/whoami",service="probe",status="401"}'
        in metrics
    )
    assert "omni_outbox_backlog" in metrics
    assert elsewhere.status_code == 404


def test_kafka_security_follows_the_listener() -> None:
    from faststream.security import SASLScram512
    from omni_common.kafka import broker_security

    assert broker_security(ServiceSettings()) is None
    scram = broker_security(
        ServiceSettings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_username="inventory",
            kafka_sasl_password="s3cret",
        )
    )
    assert isinstance(scram, SASLScram512)
    assert scram.use_ssl and scram.username == "inventory"
    with pytest.raises(ValueError, match="KAFKA_SASL_USERNAME"):
        broker_security(ServiceSettings(kafka_security_protocol="SASL_SSL"))
    with pytest.raises(ValueError, match="PLAINTEXT, SSL or SASL_SSL"):
        broker_security(ServiceSettings(kafka_security_protocol="SASL_PLAINTEXT"))


class _LingeringSettings(ServiceSettings):
    service_name: str = "lingering"
    consumer_linger_ms: int = 100
    own_field: int = 1


def test_a_service_keeps_what_the_platform_settings_set_and_its_own_defaults_otherwise(
    monkeypatch,
) -> None:
    monkeypatch.setenv("HANDLER_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("OWN_FIELD", "3")
    plain = ServiceSettings(service_name="given", consumer_batch_max=5)
    mine = _LingeringSettings.from_settings(plain, consumer_queue_size=9)
    assert (mine.service_name, mine.consumer_batch_max, mine.handler_max_attempts) == (
        "given",
        5,
        7,
    )
    assert mine.consumer_queue_size == 9  # overrides win
    assert mine.own_field == 3  # its own fields from the environment
    assert mine.consumer_linger_ms == 100  # not the platform's default of 0
    assert _LingeringSettings.from_settings(mine) is mine


def test_omni_env_is_production_unless_said_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNI_ENV", raising=False)
    assert not ServiceSettings().development
    monkeypatch.setenv("OMNI_ENV", "development")
    assert ServiceSettings().development
    monkeypatch.setenv("OMNI_ENV", "laptop")
    with pytest.raises(ValueError, match="omni_env"):
        ServiceSettings()


def test_a_service_warns_at_start_up_when_shopper_tokens_are_not_pinned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loose = ServiceSettings(shopper_token_hs256_secret="s" * 32)
    assert [w.split()[0] for w in loose.startup_warnings()] == [
        "SHOPPER_TOKEN_ISSUER",
        "SHOPPER_TOKEN_AUDIENCE",
    ]
    pinned = ServiceSettings(
        shopper_token_hs256_secret="s" * 32,
        shopper_token_issuer="https://id.example",
        shopper_token_audience="omni",
    )
    assert pinned.startup_warnings() == []
    # No shopper token accepted at all: nothing to pin.
    assert ServiceSettings().startup_warnings() == []

    class Refusing(ServiceSettings):
        def startup_refusals(self) -> list[str]:
            return ["SOMETHING is not set"]

    async def start() -> None:
        refusing = Refusing(service_name="probe", shopper_token_hs256_secret="s" * 32)
        app = create_http_app(ServiceRuntime(refusing), title="probe")
        async with app.router.lifespan_context(app):
            pass

    with caplog.at_level("WARNING"), pytest.raises(Misconfigured, match="SOMETHING is not set"):
        asyncio.run(start())
    assert "SHOPPER_TOKEN_ISSUER is not set" in caplog.text
