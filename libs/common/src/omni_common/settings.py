"""Settings read from the environment (12-factor): one class for every service."""

from __future__ import annotations

from functools import cached_property

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What a service needs to know about the world it runs in.

    Every field can be set through an environment variable of the same name in upper case
    (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``, ...).
    """

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    service_name: str = "omni"
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

    # Bearer API keys, one per channel: "web=KEY1,app=KEY2,pos=KEY3". No keys: every
    # protected endpoint answers 401 (secure by default).
    api_keys: SecretStr = SecretStr("")

    # Bounded attempts for a handler failing while the database answers, before the message
    # goes to the DLQ (failures during an outage wait for the database and are not counted).
    handler_max_attempts: int = Field(default=4, ge=1)
    handler_backoff_initial_s: float = Field(default=0.05, gt=0)
    handler_backoff_max_s: float = Field(default=2.0, gt=0)
    # Latency-critical consumers: Tansu waits the full fetch_max_wait_ms on an empty fetch.
    consumer_fetch_max_wait_ms: int = 5
    # Group membership timing. Tansu holds a join for about half the session timeout, so
    # tests use a short one; production keeps Kafka's defaults.
    # Handled offsets are committed this often (a crash redelivers at most this much work,
    # which the inbox absorbs) instead of one broker round trip per message.
    consumer_commit_interval_ms: int = Field(default=100, gt=0)
    # Messages fetched ahead per partition while its worker is busy; beyond it that
    # partition (alone) is paused at the consumer until its queue drains to half.
    consumer_queue_size: int = Field(default=64, gt=1)
    # How long a revoked partition's in-flight message may finish before the rebalance goes
    # on without it (it is then redelivered to the new owner; the inbox absorbs it).
    consumer_revoke_grace_s: float = Field(default=5.0, gt=0)
    consumer_session_timeout_ms: int = 10_000
    consumer_heartbeat_interval_ms: int = 3_000

    log_level: str = "INFO"
    log_json: bool = True
    otel_exporter_otlp_endpoint: str | None = None

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

    @cached_property
    def api_key_map(self) -> dict[str, str]:
        """Map of API key -> channel name."""
        keys: dict[str, str] = {}
        for item in self.api_keys.get_secret_value().split(","):
            item = item.strip()
            if not item:
                continue
            channel, sep, key = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"API_KEYS entry {channel!r} is not CHANNEL=KEY")
            keys[key.strip()] = channel.strip()
        return keys
