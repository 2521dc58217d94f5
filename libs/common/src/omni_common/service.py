"""The runtime every service is composed from: settings, database, Kafka, outbox, timers.

A service's ``create_app()`` builds one :class:`ServiceRuntime`, provides its dependencies,
registers its subscriptions, timers and outputs on it, and hands it to
:func:`omni_common.http.create_http_app`::

    runtime = ServiceRuntime(settings, migrations_package="inventory_service.migrations")
    runtime.provide(inventory=inventory, metrics=metrics)
    runtime.subscribe(*subscriptions())
    runtime.timers({RESERVATION_EXPIRY: reservations_expired}, poll_interval_s=0.5)
    runtime.publishes(INVENTORY_AVAILABILITY)

Nothing connects until the app starts, so building an app is cheap and side-effect free
(``describe_service`` relies on that to derive ACLs from the code). The handler shape is
in :mod:`omni_common.handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import asyncpg
from omni_contracts import utcnow
from omni_contracts.base import Event
from omni_contracts.envelope import Envelope, PayloadError, decode, new_envelope
from opentelemetry import context as otel_context

from omni_common.db import create_pool, migrate
from omni_common.dispatch import (
    Dispatcher,
    HandledBefore,
    Handling,
    InvalidOutgoingEvent,
    Route,
    Trace,
    Valid,
)
from omni_common.handlers import (
    BoundHandler,
    Clock,
    Handle,
    Handler,
    Refusal,
    Subscription,
    bind,
)
from omni_common.inbox import first_delivery
from omni_common.kafka import KafkaRuntime
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
from omni_common.telemetry import configure_tracing, trace_headers_of
from omni_common.timers import TimerWheel

log = logging.getLogger(__name__)


class Tx:
    """One database transaction of a service, able to emit events through the outbox.

    What it emits is written when it commits, in one statement with the inbox records of
    the events it handles; never if it rolls back.
    """

    __slots__ = ("_after", "_runtime", "_traces", "conn", "origin", "rows", "shared")

    def __init__(
        self,
        conn: asyncpg.Connection,
        runtime: ServiceRuntime,
        traces: Mapping[str, Trace] | None = None,
    ) -> None:
        self.conn = conn
        self.origin: str | None = None
        """Who is writing (a handler's or timer's name): named when it emits a bad event."""
        self.rows: list[OutboxRow] = []
        self.shared: dict[str, Any] = {}
        """What the handlers of this transaction share: a lot's stock, read once by its
        ``prepare``, serves every handler after it."""
        self._runtime = runtime
        self._traces = traces or {}
        self._after: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this transaction has committed (never if it rolls back).

        For what must only happen once the change is visible: waking a worker that will
        read it, counting what is now true.
        """
        self._after.append(callback)

    async def emit(
        self,
        event: Event,
        *,
        caused_by: Envelope | None = None,
        correlation_id: str | None = None,
    ) -> Envelope:
        """Publish ``event`` once this transaction commits (never if it rolls back).

        ``caused_by`` links it into the journey (and the trace) of the event that caused it.
        """
        envelope = new_envelope(
            event, source=self._runtime.source, caused_by=caused_by, correlation_id=correlation_id
        )
        self.rows.append(self._row(event, envelope, caused_by))
        return envelope

    async def emit_all(
        self,
        events: Sequence[Event],
        *,
        caused_by: Envelope | None = None,
        correlation_ids: Sequence[str | None] | None = None,
    ) -> list[Envelope]:
        """Publish many events once this transaction commits (``correlation_ids``: one per
        event, each event's journey)."""
        ids = correlation_ids if correlation_ids is not None else [None] * len(events)
        envelopes = []
        for event, cid in zip(events, ids, strict=True):
            envelopes.append(await self.emit(event, caused_by=caused_by, correlation_id=cid))
        return envelopes

    async def emit_tombstone(self, topic: str, key: str) -> None:
        """Publish a tombstone for ``key`` on compacted ``topic`` once this transaction commits."""
        self.rows.append(tombstone_row(topic, key, str(uuid.uuid4())))

    def trace_of(self, cause: Envelope | None) -> dict[str, str] | None:
        """The trace headers of the event ``cause`` is (None: the current trace), for what it
        arms or writes to carry its journey on (a timer, an event)."""
        trace = self._traces.get(cause.id) if cause is not None else None
        if isinstance(trace, otel_context.Context):
            return trace_headers_of(trace)
        return trace

    def _row(self, event: Event, envelope: Envelope, caused_by: Envelope | None) -> OutboxRow:
        row = outbox_row(event.topic, event, envelope, self.trace_of(caused_by))
        # What leaves must be what the contract says: checked on the bytes that will be sent,
        # so a handler that built a bad event is named here, not by every consumer.
        try:
            decode(type(event), row[5])
        except PayloadError as exc:
            raise InvalidOutgoingEvent(
                f"{self.origin or 'a transaction'} emitted an invalid {event.ce_type}: {exc}"
            ) from exc
        return row


_RECORD = (
    "WITH new AS (INSERT INTO inbox (consumer, ce_id, ce_type)"
    " SELECT $1, * FROM unnest($2::uuid[], $3::text[])"
    " ON CONFLICT DO NOTHING RETURNING 1),"
    " emitted AS (INSERT INTO outbox (ce_id, ce_type, topic, key, headers, payload)"
    " SELECT ce_id, ce_type, topic, key, headers::jsonb, payload FROM unnest("
    "$4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bytea[])"
    " WITH ORDINALITY AS r(ce_id, ce_type, topic, key, headers, payload, n) ORDER BY n)"
    " SELECT count(*) FROM new"
)


@dataclass(frozen=True)
class ServiceDescription:
    """What a service reads and writes on Kafka, derived from its code."""

    name: str
    consumes: frozenset[str]
    produces: frozenset[str]
    group_id: str
    # Read without a consumer group (a feed tailing a topic): Read ACLs, no group, no scaling.
    reads: frozenset[str] = frozenset()


class ServiceRuntime:
    """Everything a service needs at run time, started and stopped as one."""

    def __init__(
        self,
        settings: ServiceSettings,
        migrations_package: str | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self.source = f"/services/{settings.service_name}"
        self.migrations_package = migrations_package
        self.clock = clock
        self.metrics = PlatformMetrics(settings.service_name)
        self.kafka = KafkaRuntime(settings, self.metrics)
        self.dispatcher = Dispatcher(settings, self.metrics, self, self.kafka.send)
        self.relay = OutboxRelay(
            dsn=settings.database_url.get_secret_value(),
            schema=settings.schema,
            publish=self.kafka.publish_outbox_message,
            metrics=self.metrics,
            linger_s=settings.outbox_relay_linger_ms / 1000,
        )
        self.ready = False
        # One inbox name per service: a ce_id is unique across topics.
        self._inbox_name = settings.service_name
        self._provided: dict[str, Any] = {"clock": clock}
        self._pool: asyncpg.Pool | None = None
        self._on_start: list[contextlib.AbstractAsyncContextManager[object]] = []
        self._exit_stack: contextlib.AsyncExitStack | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The service's connection pool (available once started)."""
        if self._pool is None:
            raise RuntimeError("the service has not started")
        return self._pool

    # -- composition ----------------------------------------------------------------------

    def provide(self, **dependencies: Any) -> None:
        """Name the dependencies handlers may ask for (by parameter name); before subscribing."""
        self._provided.update(dependencies)

    def bind(self, handler: Handler) -> BoundHandler:
        """``handler`` with its dependencies bound (see :mod:`omni_common.handlers`)."""
        return bind(handler, self._provided)

    def subscribe(self, *subscriptions: Subscription) -> None:
        """Consume each subscription's topic with its handlers."""
        for subscription in subscriptions:
            bound: dict[int, BoundHandler] = {}  # one binding per function: one call per run
            handlings: dict[str, Handling] = {}
            for model, target in subscription.handlers.items():
                handle = target if isinstance(target, Handle) else Handle(target)
                fn = handle.handler
                call = bound.get(id(fn)) or bound.setdefault(id(fn), self.bind(fn))
                handlings[model.ce_type] = Handling(model, call, call.__name__, handle.relevant)
            together, prepare = subscription.together, subscription.prepare
            self.kafka.add_route(
                Route(
                    topic=subscription.topic,
                    handlings=handlings,
                    known_types=self.kafka.contract_types(subscription.topic),
                    joins_lot=(
                        None if together is True else together if callable(together) else _alone
                    ),
                    prepare=self.bind(prepare) if prepare is not None else None,
                )
            )

    def timers(self, handlers: Mapping[str, Handler], **options: Any) -> TimerWheel:
        """Fire the durable timers of ``handlers``' kinds while the service runs.

        ``options`` are :class:`~omni_common.timers.TimerWheel`'s (poll interval, batch
        sizes, concurrency).
        """
        wheel = TimerWheel(
            self.transaction,
            {kind: self.bind(handler) for kind, handler in handlers.items()},
            metrics=self.metrics,
            health=self.database_problem,
            **options,
        )
        self.run_alongside(wheel.running())
        return wheel

    def on_refusal(self, observe: Callable[[Refusal], None]) -> None:
        """Call ``observe`` with every refusal of an event, once it is dead-lettered."""
        self.dispatcher.refusal_observers.append(observe)

    def publishes(self, *topics: str) -> None:
        """Declare the topics this service writes through its outbox."""
        for topic in topics:
            self.kafka.declare_output(topic)

    def run_alongside(self, context: contextlib.AbstractAsyncContextManager[object]) -> None:
        """Run a background component (timers, sinks) while the service runs.

        It is entered after the database and broker are up and left before they go down.
        """
        self._on_start.append(context)

    def describe(self) -> ServiceDescription:
        """What this service reads and writes on Kafka."""
        k = self.kafka
        return ServiceDescription(
            name=self.settings.service_name,
            consumes=frozenset(k.consumes),
            produces=frozenset(k.produces),
            group_id=self.settings.group_id(),
            reads=frozenset(k.reads),
        )

    # -- transactions ---------------------------------------------------------------------

    def _acquire(self) -> Any:
        # Bounded: an exhausted pool is an infrastructure error (retried), not a hang.
        return self.pool.acquire(timeout=self.settings.db_acquire_timeout_s)

    @contextlib.asynccontextmanager
    async def transaction(self, origin: str | None = None) -> AsyncIterator[Tx]:
        """A transaction for a change that does not come from an event (HTTP, a timer)."""
        async with self._acquire() as conn:
            async with conn.transaction():
                tx = Tx(conn, self)
                tx.origin = origin
                yield tx
                await self._write(tx, ())
            self._committed(tx)

    @contextlib.asynccontextmanager
    async def handling(
        self, events: Sequence[Valid], *, check_first: bool
    ) -> AsyncIterator[Tx | None]:
        """The transaction ``events`` are handled in, with their inbox records.

        ``check_first`` (an event handled alone): the inbox is asked before the effect, and
        None is yielded for an event handled before. Otherwise (a lot: redeliveries are rare)
        the records are written at the end, with what the lot emits, in one statement, and
        :class:`HandledBefore` rolls the lot back if any was there already.
        """
        traces = {v.envelope.id: v.trace for v in events}
        async with self._acquire() as conn:
            async with conn.transaction():
                tx = Tx(conn, self, traces)
                if check_first:
                    (only,) = events
                    if not await first_delivery(conn, self._inbox_name, only.envelope):
                        yield None
                        return
                    yield tx
                    await self._write(tx, ())
                else:
                    yield tx
                    await self._write(tx, events)
            self._committed(tx)

    async def _write(self, tx: Tx, handled: Sequence[Valid]) -> None:
        """The inbox records and the emitted events, in one round trip, before the commit."""
        rows = tx.rows
        if handled:
            columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)] or [[]] * 6
            inserted = await tx.conn.fetchval(
                _RECORD,
                self._inbox_name,
                [v.envelope.id for v in handled],
                [v.envelope.type for v in handled],
                *columns,
            )
            if inserted != len(handled):
                raise HandledBefore(f"{len(handled) - inserted} of {len(handled)} handled before")
        elif rows:
            await insert_outbox_rows(tx.conn, rows)
        # The relay of this process is woken in-process; only when another instance leads is
        # a NOTIFY needed (it takes a cluster-wide lock at commit, so not on every commit).
        if rows and not self.relay.leading:
            await tx.conn.execute("SELECT pg_notify($1, '')", notify_channel(self.settings.schema))

    def _committed(self, tx: Tx) -> None:
        if tx.rows:
            self.relay.wake()
        for callback in tx._after:
            callback()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate, connect, start consuming and relaying; then report ready."""
        s = self.settings
        await migrate(s, self.migrations_package)
        self._pool = await create_pool(s)
        await self.kafka.start(self.dispatcher)
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
        # In order: stop fetching, finish in-flight events, commit; then let the relay
        # publish what they wrote and stop it; only then leave the group and disconnect.
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


def _alone(event: Event) -> bool:
    """``Subscription.together=False``: no event of the topic joins a lot."""
    return False


def configure_process(settings: ServiceSettings) -> None:
    """Process-wide setup for a service process: logging and tracing."""
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    configure_tracing(settings.service_name, settings.otel_exporter_otlp_endpoint)


def service_factories() -> dict[str, EntryPoint]:
    """The installed services' ``create_app`` entry points (group ``omni.services``)."""
    return {ep.name: ep for ep in entry_points(group="omni.services")}


def service_names() -> list[str]:
    """The services installed in this environment (entry point group ``omni.services``)."""
    return sorted(service_factories())


def describe_service(name: str) -> ServiceDescription:
    """Build a service's app (without starting it) and report its topics."""
    app = service_factories()[name].load()(ServiceSettings(service_name=name))
    runtime: ServiceRuntime = app.state.runtime
    return runtime.describe()
