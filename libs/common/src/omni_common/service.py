"""The runtime every service is composed from: settings, database, Kafka, outbox, metrics.

A service's ``create_app()`` builds one :class:`ServiceRuntime`, registers its
subscriptions and outputs on it, and hands it to :func:`omni_common.http.create_http_app`.
Nothing connects until the app starts, so building an app is cheap and side-effect free
(``describe_service`` relies on that to derive ACLs from the code).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import asyncpg
from omni_contracts.base import Event
from omni_contracts.envelope import Envelope, new_envelope

from omni_common.db import create_pool, migrate
from omni_common.inbox import first_delivery
from omni_common.kafka import KafkaRuntime, Subscription
from omni_common.logging import configure_logging
from omni_common.metrics import PlatformMetrics
from omni_common.outbox import (
    OutboxRelay,
    OutboxRow,
    insert_outbox_rows,
    notify_channel,
    outbox_row,
    tombstone_row,
)
from omni_common.settings import ServiceSettings
from omni_common.telemetry import configure_tracing

log = logging.getLogger(__name__)


class Tx:
    """One database transaction of a service, able to emit events through the outbox."""

    def __init__(
        self, conn: asyncpg.Connection, runtime: ServiceRuntime, batch: _Batch | None = None
    ) -> None:
        self.conn = conn
        self._runtime = runtime
        self._batch = batch
        self.emitted = False
        self._after: list[Callable[[], None]] = batch.after if batch is not None else []

    @property
    def in_lot(self) -> bool:
        """Whether this is part of a lot handled together, which may still roll back and
        come again event by event: count a refusal only when it is not."""
        return self._batch is not None

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this transaction has committed (never if it rolls back).

        For what must only happen once the change is visible: waking a worker that will
        read it, counting what is now true.
        """
        self._after.append(callback)

    def _committed(self) -> None:
        for callback in self._after:
            callback()

    async def _write(self, rows: list[OutboxRow]) -> None:
        self.emitted = True
        if self._batch is not None:
            # Handled together with other events: one outbox write for the lot, in order.
            self._batch.rows.extend(rows)
        else:
            await insert_outbox_rows(self.conn, rows)

    async def emit(
        self,
        event: Event,
        *,
        caused_by: Envelope | None = None,
        correlation_id: str | None = None,
    ) -> Envelope:
        """Publish ``event`` once this transaction commits (never if it rolls back)."""
        rt = self._runtime
        envelope = new_envelope(
            event, source=rt.source, caused_by=caused_by, correlation_id=correlation_id
        )
        await self._write([outbox_row(event.topic, event, envelope)])
        return envelope

    async def emit_all(
        self,
        events: Sequence[Event],
        *,
        caused_by: Envelope | None = None,
        correlation_ids: Sequence[str | None] | None = None,
    ) -> list[Envelope]:
        """Publish many events once this transaction commits, written in one round trip.

        ``correlation_ids`` (one per event) name each event's journey.
        """
        rt = self._runtime
        ids = correlation_ids if correlation_ids is not None else [None] * len(events)
        envelopes = [
            new_envelope(event, source=rt.source, caused_by=caused_by, correlation_id=cid)
            for event, cid in zip(events, ids, strict=True)
        ]
        await self._write(
            [outbox_row(e.topic, e, env) for e, env in zip(events, envelopes, strict=True)]
        )
        return envelopes

    async def emit_tombstone(self, topic: str, key: str) -> None:
        """Publish a tombstone for ``key`` on compacted ``topic`` once this transaction commits."""
        await self._write([tombstone_row(topic, key, str(uuid.uuid4()))])


@dataclass
class _Batch:
    """The transaction a partition's waiting events are handled in together."""

    conn: asyncpg.Connection
    rows: list[OutboxRow] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)
    # (consumer, ce_id) -> ce_type of each event handled in the lot: its inbox records,
    # written in one statement before the commit (see ``ServiceRuntime.handling``).
    inbox: dict[tuple[str, str], str] = field(default_factory=dict)


class HandledBefore(Exception):
    """Some events of a lot handled together were already in the inbox (a redelivery).

    The lot rolls back and its events are handled one by one, where each duplicate is
    recognised before its effect.
    """


_RECORD_LOT = (
    "WITH new AS (INSERT INTO inbox (consumer, ce_id, ce_type)"
    " SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[])"
    " ON CONFLICT DO NOTHING RETURNING 1),"
    " emitted AS (INSERT INTO outbox (ce_id, ce_type, topic, key, headers, payload)"
    " SELECT ce_id, ce_type, topic, key, headers::jsonb, payload FROM unnest("
    "$4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bytea[])"
    " WITH ORDINALITY AS r(ce_id, ce_type, topic, key, headers, payload, n) ORDER BY n)"
    " SELECT count(*) FROM new"
)


async def _record_lot(
    conn: asyncpg.Connection, inbox: dict[tuple[str, str], str], rows: Sequence[OutboxRow]
) -> None:
    """Write a lot's inbox records and the events it emits (in order) in one statement;
    HandledBefore if any inbox record was there already."""
    if not inbox:
        await insert_outbox_rows(conn, rows)
        return
    consumers, ids = zip(*inbox, strict=True)
    columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)] or [[]] * 6
    inserted = await conn.fetchval(
        _RECORD_LOT, list(consumers), list(ids), list(inbox.values()), *columns
    )
    if inserted != len(inbox):
        raise HandledBefore(f"{len(inbox) - inserted} of {len(inbox)} events handled before")


# Set while a run of events is handled together: ``handling()`` joins its transaction.
_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("omni_batch", default=None)


class ServiceRuntime:
    """Everything a service needs at run time, started and stopped as one."""

    def __init__(self, settings: ServiceSettings, migrations_package: str | None = None) -> None:
        self.settings = settings
        self.source = f"/services/{settings.service_name}"
        self.migrations_package = migrations_package
        self.metrics = PlatformMetrics(settings.service_name)
        self.kafka = KafkaRuntime(settings, self.metrics)
        self.kafka.health_check = self.database_problem
        self.kafka.batch_transaction = self.handling_together
        self._pool: asyncpg.Pool | None = None
        self.relay = OutboxRelay(
            dsn=settings.database_url.get_secret_value(),
            schema=settings.schema,
            publish=self.kafka.publish_outbox_message,
            metrics=self.metrics,
        )
        self.ready = False
        self._on_start: list[contextlib.AbstractAsyncContextManager[object]] = []
        self._exit_stack: contextlib.AsyncExitStack | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The service's connection pool (available once started)."""
        if self._pool is None:
            raise RuntimeError("the service has not started")
        return self._pool

    # -- composition ----------------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> None:
        """Consume a topic (see :class:`omni_common.kafka.Subscription`)."""
        self.kafka.subscribe(subscription)

    def publishes(self, *topics: str) -> None:
        """Declare the topics this service writes through its outbox."""
        for topic in topics:
            self.kafka.declare_output(topic)

    def run_alongside(self, context: contextlib.AbstractAsyncContextManager[object]) -> None:
        """Run a background component (timers, sinks) while the service runs.

        It is entered after the database and broker are up and left before they go down.
        """
        self._on_start.append(context)

    # -- units of work --------------------------------------------------------------------

    def _acquire(self) -> Any:
        # Bounded: an exhausted pool is an infrastructure error (retried), not a hang.
        return self.pool.acquire(timeout=self.settings.db_acquire_timeout_s)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """A transaction for a state change that does not come from an event (HTTP, timers)."""
        async with self._acquire() as conn:
            async with conn.transaction():
                tx = Tx(conn, self)
                yield tx
                await self._before_commit(conn, tx.emitted)
            self._after_commit(tx.emitted)
            tx._committed()

    @contextlib.asynccontextmanager
    async def handling(self, consumer: str, envelope: Envelope) -> AsyncIterator[Tx | None]:
        """A transaction for handling one event; yields None when it was handled before.

        The inbox record, the effect and the events it causes commit together. While the
        Kafka runtime handles a partition's waiting events together, this joins their one
        transaction instead (which commits, or rolls back, for the lot).
        """
        batch = _BATCH.get()
        if batch is not None:
            # Optimistic: redeliveries are rare, so the lot's inbox records are written
            # together at its end, and any already there roll the lot back (HandledBefore).
            key = (consumer, envelope.id)
            if key in batch.inbox:
                log.info("duplicate %s %s ignored", envelope.type, envelope.id)
                yield None
                return
            batch.inbox[key] = envelope.type
            yield Tx(batch.conn, self, batch)
            return
        async with self.transaction() as tx:
            if not await first_delivery(tx.conn, consumer, envelope):
                log.info("duplicate %s %s ignored", envelope.type, envelope.id)
                yield None
                return
            yield tx

    @contextlib.asynccontextmanager
    async def handling_together(self) -> AsyncIterator[asyncpg.Connection]:
        """One transaction for several events: each ``handling()`` inside joins it."""
        if _BATCH.get() is not None:
            raise RuntimeError("already handling events together")
        async with self._acquire() as conn:
            async with conn.transaction():
                batch = _Batch(conn)
                token = _BATCH.set(batch)
                try:
                    yield conn
                finally:
                    _BATCH.reset(token)
                await _record_lot(conn, batch.inbox, batch.rows)
                await self._before_commit(conn, bool(batch.rows))
            self._after_commit(bool(batch.rows))
            for callback in batch.after:
                callback()

    async def _before_commit(self, conn: asyncpg.Connection, emitted: bool) -> None:
        # The relay of this process is woken in-process; only when another instance leads is
        # a NOTIFY needed (it takes a cluster-wide lock at commit, so not on every commit).
        if emitted and not self.relay.leading:
            await conn.execute("SELECT pg_notify($1, '')", notify_channel(self.settings.schema))

    def _after_commit(self, emitted: bool) -> None:
        if emitted:
            self.relay.wake()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate, connect, start consuming and relaying; then report ready."""
        s = self.settings
        configure_tracing(s.service_name, s.otel_exporter_otlp_endpoint)
        await migrate(s, self.migrations_package)
        self._pool = await create_pool(s)
        await self.kafka.start()
        await self.relay.start()
        self._exit_stack = contextlib.AsyncExitStack()
        for component in self._on_start:
            await self._exit_stack.enter_async_context(component)
        self.ready = True
        self.metrics.ready.labels(s.service_name).set(1)
        log.info("%s ready", s.service_name)

    async def stop(self) -> None:
        """Stop taking work, finish what is in flight, then disconnect."""
        self.ready = False
        self.metrics.ready.labels(self.settings.service_name).set(0)
        if self._exit_stack:
            await self._exit_stack.aclose()
        # In order: stop fetching, finish in-flight messages, commit; then let the relay
        # publish what they wrote and stop it; only then leave the groups and disconnect.
        await self.kafka.drain()
        await self.relay.stop()
        await self.kafka.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def database_problem(self) -> str | None:
        """None when the database answers ``SELECT 1`` within 2 s, else why not."""
        if self._pool is None:
            return "the service has not started"
        try:
            async with asyncio.timeout(2):
                await self._pool.fetchval("SELECT 1")
        except Exception as exc:
            return f"database: {type(exc).__name__}: {exc}"
        return None

    async def check_ready(self) -> str | None:
        """None when ready, else why not (for ``/readyz``): database and broker answer."""
        if not self.ready:
            return "starting"
        if problem := await self.database_problem():
            return problem
        if not await self.kafka.broker.ping(timeout=2):
            return "kafka: broker unreachable"
        return None


def configure_process(settings: ServiceSettings) -> None:
    """Process-wide setup for a service process: logging and tracing."""
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    configure_tracing(settings.service_name, settings.otel_exporter_otlp_endpoint)


@dataclass(frozen=True)
class ServiceDescription:
    """What a service reads and writes on Kafka, derived from its code."""

    name: str
    consumes: frozenset[str]
    produces: frozenset[str]
    group_id: str
    # Read without a consumer group (a feed tailing a topic): Read ACLs, no group, no scaling.
    reads: frozenset[str] = frozenset()


def service_factories() -> dict[str, EntryPoint]:
    """The installed services' ``create_app`` entry points (group ``omni.services``)."""
    return {ep.name: ep for ep in entry_points(group="omni.services")}


def service_names() -> list[str]:
    """The services installed in this environment (entry point group ``omni.services``)."""
    return sorted(service_factories())


def describe_service(name: str) -> ServiceDescription:
    """Build a service's app (without starting it) and report its topics."""
    settings = ServiceSettings(service_name=name)
    app = service_factories()[name].load()(settings)
    runtime: ServiceRuntime = app.state.runtime
    return ServiceDescription(
        name=name,
        consumes=frozenset(runtime.kafka.consumes),
        produces=frozenset(runtime.kafka.produces),
        group_id=settings.group_id(),
        reads=frozenset(runtime.kafka.reads),
    )
