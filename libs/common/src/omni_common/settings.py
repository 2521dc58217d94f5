"""Settings read from the environment (12-factor): one class for every service.

Durations follow one rule across the platform. A setting whose name ends in its unit
(``_MS``, ``_S``, ``_MINUTES``, ``_HOURS``, ``_DAYS``, ``_MONTHS``) takes a plain number of
that unit. A duration named without a unit is a :data:`Duration`: seconds (``3600``, ``0.5``)
or ISO 8601 (``PT1H``, ``P7D``).
"""

from __future__ import annotations

import math
from datetime import timedelta
from functools import cached_property
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from omni_common.auth import ApiKey, ShopperTokens, parse_api_keys

_ISO_8601 = TypeAdapter(timedelta)
_DURATION_HELP = "give seconds (3600, 0.5) or an ISO 8601 duration (PT1H, P7D)"


def parse_duration(value: Any) -> timedelta:
    """``value`` as a duration: a :class:`~datetime.timedelta`, seconds (a number, or a
    string such as ``"3600"`` or ``"0.5"``) or an ISO 8601 duration (``"PT1H"``, ``"P7D"``,
    ``"P1DT2H30M"``; a month counts 30 days, a year 365).

    Raises ValueError, in one line, for anything else and for a negative duration.
    """
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a duration: {_DURATION_HELP}")
        duration = timedelta(seconds=value)
    elif isinstance(value, str):
        duration = _parse_duration_text(value)
    else:
        raise ValueError(f"a {type(value).__name__} is not a duration: {_DURATION_HELP}")
    if duration < timedelta(0):
        raise ValueError(f"a duration cannot be negative ({value!r})")
    return duration


def _parse_duration_text(value: str) -> timedelta:
    text = value.strip()
    refused = ValueError(f"{text[:40]!r} is not a duration: {_DURATION_HELP}")
    if text.upper().startswith("P"):
        try:
            return _ISO_8601.validate_python(text.upper())
        except ValidationError:
            raise refused from None
    try:
        seconds = float(text)
    except ValueError:
        raise refused from None
    if not math.isfinite(seconds):
        raise refused
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
"""A duration setting: seconds (``3600``, ``0.5``) or ISO 8601 (``PT1H``, ``P7D``)."""


class Misconfigured(RuntimeError):
    """A service refuses to start with its settings (the message names variables, never
    their values)."""


class ServiceSettings(BaseSettings):
    """What a service needs to know about the world it runs in.

    Every field can be set through an environment variable of the same name in upper case
    (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``, ...).
    """

    # hide_input_in_errors: a refused API_KEYS or secret must never be echoed in the error.
    model_config = SettingsConfigDict(
        env_file=None, extra="ignore", frozen=True, hide_input_in_errors=True
    )

    service_name: str = "omni"
    # Where the service runs. `omni dev up` and the test fixtures say "development"; anything
    # else is production, so a deployment that forgets the variable is held to production's
    # rules (see startup_refusals) rather than to a laptop's.
    omni_env: Literal["development", "production"] = "production"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # PLAINTEXT (dev, compose), SSL, or SASL_SSL with SCRAM (Strimzi KafkaUser in Kubernetes).
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/omni")
    # Prepended to every topic and consumer-group name; tests use it to isolate runs that
    # share one broker. Empty in production.
    topic_prefix: str = ""
    # Per-service database schema; defaults to the service name with '-' -> '_'.
    db_schema: str | None = None
    db_pool_min: int = 2
    db_pool_max: int = 10
    # Every database call is bounded: a connect, a wait for a pooled connection, a
    # statement, a lock wait, a transaction left idle (a stuck caller releases its locks).
    db_connect_timeout_s: float = Field(default=10.0, gt=0)
    db_acquire_timeout_s: float = Field(default=10.0, gt=0)
    db_statement_timeout_ms: int = Field(default=30_000, ge=0)
    db_lock_timeout_ms: int = Field(default=10_000, ge=0)
    db_idle_in_transaction_timeout_ms: int = Field(default=60_000, ge=0)

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # Prometheus metrics are served here, on HTTP_HOST, never on the API port: scraped from
    # inside the cluster, reached by no Service or Ingress. The default is the port
    # registered for OpenTelemetry's Prometheus exporters; 0 lets the kernel pick (tests).
    metrics_port: int = Field(default=9464, ge=0, le=65535)

    # Bearer API keys with their channel and scopes (see omni_common.auth):
    # "ops:KEY1:admin,pos:KEY2:sales.write+stock.read,web:KEY3" (no scopes: the channel's
    # defaults; the older "web=KEY3" works too). No keys: every protected endpoint answers
    # 401 (secure by default). Checked when the settings are built: a bad entry stops the
    # service with a message that never quotes a key.
    api_keys: SecretStr = SecretStr("")

    # Shopper tokens (JWT, sub = customer_id) for web and app: one of an HS256 secret
    # (development), a JWKS file or a JWKS URL (RS256/ES256, the identity provider's).
    shopper_token_hs256_secret: SecretStr | None = None
    shopper_token_jwks_file: str | None = None
    shopper_token_jwks_url: str | None = None
    shopper_token_issuer: str | None = None
    shopper_token_audience: str | None = None
    shopper_token_leeway_s: int = Field(default=30, ge=0, le=300)

    # Request bodies above this size are refused (413) before they are read.
    http_max_body_bytes: int = Field(default=256 * 1024, gt=0)
    # FastAPI's /docs, /redoc and /openapi.json: off in production unless asked for.
    http_docs_enabled: bool = False

    # Bounded attempts for a handler failing while the database answers, before the message
    # goes to the DLQ (failures during an outage wait for the database and are not counted).
    handler_max_attempts: int = Field(default=4, ge=1)
    handler_backoff_initial_s: float = Field(default=0.05, gt=0)
    handler_backoff_max_s: float = Field(default=2.0, gt=0)
    # How long the broker may hold an empty fetch. Unset: chosen per broker at start-up.
    # Apache Kafka answers as soon as data arrives, so a long wait costs no latency and
    # spares idle CPU (1 s); Tansu waits the full time, so it gets 5 ms.
    consumer_fetch_max_wait_ms: int | None = Field(default=None, ge=0)
    # Messages of one partition handled in one transaction when they are waiting together
    # (one commit, one outbox write for the lot); 1 handles each alone.
    consumer_batch_max: int = Field(default=64, ge=1)
    # After handing over what a fetch brought, a consumer waits this long before taking
    # more: events arriving meanwhile come in one fetch and are handled as one lot, so a
    # busy service makes fewer fetches and fewer transactions. The first event after a
    # quiet spell is not delayed. 0 (the default) for services a shopper waits on.
    consumer_linger_ms: int = Field(default=0, ge=0, le=1000)
    # After the outbox relay published a round, what commits meanwhile waits this long and
    # goes in the next round together: fewer statements and produce requests under load.
    # The first event after a quiet spell is not delayed. 0 where a shopper waits.
    outbox_relay_linger_ms: int = Field(default=0, ge=0, le=1000)
    # Group membership timing. Tansu holds a join for about half the session timeout, so
    # tests use a short one; production keeps Kafka's defaults.
    # Handled offsets are committed this often (a crash redelivers at most this much work,
    # which the inbox absorbs) instead of one broker round trip per message. Each commit is
    # a write to the broker's offsets log: at 100 ms, seven busy consumers made 70 a second.
    # A rebalance and a clean stop commit at once, whatever the interval.
    consumer_commit_interval_ms: int = Field(default=1000, gt=0)
    # Messages fetched ahead per partition while its worker is busy; beyond it that
    # partition (alone) is paused at the consumer until its queue drains to half. Large
    # enough that a busy partition is rarely paused: a resumed one waits for the fetch in
    # flight to the broker (up to the fetch wait) before it gets data again.
    consumer_queue_size: int = Field(default=512, gt=1)
    # How long a revoked partition's in-flight message may finish before the rebalance goes
    # on without it (it is then redelivered to the new owner; the inbox absorbs it).
    consumer_revoke_grace_s: float = Field(default=5.0, gt=0)
    consumer_session_timeout_ms: int = 10_000
    consumer_heartbeat_interval_ms: int = 3_000

    log_level: str = "INFO"
    log_json: bool = True
    otel_exporter_otlp_endpoint: str | None = None

    @classmethod
    def from_settings(cls, settings: ServiceSettings | None = None, **overrides: Any) -> Self:
        """``settings`` (e.g. the plain ones ``omni run`` and the test fixtures build) as this
        service's settings.

        What was set there, given or from the environment, is kept; ``overrides`` win; every
        other field is this class's: its environment variable, else its own default (which
        may differ from the platform's).
        """
        if settings is None:
            return cls(**overrides)
        if isinstance(settings, cls) and not overrides:
            return settings
        values = {name: getattr(settings, name) for name in settings.model_fields_set}
        return cls(**(values | overrides))

    @property
    def development(self) -> bool:
        """Whether the service runs on a developer's machine (``OMNI_ENV=development``)."""
        return self.omni_env == "development"

    def startup_warnings(self) -> list[str]:
        """What the service should say once at start-up: settings it runs without that a
        production deployment wants. A service's settings may add their own."""
        warnings: list[str] = []
        if not ShopperTokens.from_settings(self).configured:
            return warnings  # no shopper token is accepted at all: nothing to pin
        # Without them a token another application of the same identity provider was given
        # (another audience) or another provider signed with a shared key would be accepted.
        for variable, value in (
            ("SHOPPER_TOKEN_ISSUER", self.shopper_token_issuer),
            ("SHOPPER_TOKEN_AUDIENCE", self.shopper_token_audience),
        ):
            if not value:
                warnings.append(
                    f"{variable} is not set: shopper tokens are accepted whatever their "
                    f"{'iss' if variable.endswith('ISSUER') else 'aud'} claim says"
                )
        return warnings

    def startup_refusals(self) -> list[str]:
        """Why the service must not start with these settings (none by default). Checked at
        start-up, not when the settings are built: building an app to describe it (its topics,
        its contract) needs no secret."""
        return []

    @property
    def schema(self) -> str:
        """The PostgreSQL schema this service owns."""
        return self.db_schema or self.service_name.replace("-", "_")

    def topic(self, name: str) -> str:
        """The physical topic name for a contract topic name."""
        return f"{self.topic_prefix}{name}"

    def group_id(self, purpose: str = "main") -> str:
        """The consumer group of this service (one per purpose)."""
        return f"{self.topic_prefix}{self.service_name}.{purpose}"

    @field_validator("api_keys")
    @classmethod
    def _keys_are_well_formed(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _shopper_tokens_are_consistent(self) -> ServiceSettings:
        ShopperTokens.from_settings(self)
        return self

    @cached_property
    def api_key_table(self) -> dict[str, ApiKey]:
        """Map of API key -> its channel and scopes."""
        return parse_api_keys(self.api_keys.get_secret_value())

    @cached_property
    def api_key_map(self) -> dict[str, str]:
        """Map of API key -> channel name."""
        return {key: entry.channel for key, entry in self.api_key_table.items()}
