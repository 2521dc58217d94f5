"""Kafka through FastStream, with the delivery rules every service follows.

For each subscription:

- offsets are committed only after the handler's effect is durable (manual acknowledgement:
  handled offsets are committed in the background every ``consumer_commit_interval_ms``,
  and a failure that could not even be dead-lettered rewinds the partition, so nothing is
  skipped and nothing is lost);
- the CloudEvents envelope and the payload are validated here, so a handler only ever sees a
  valid event; what fails goes to ``<topic>.dlq`` with the reason in headers;
- a failure while the infrastructure is down (database refusing connections, broker away)
  holds that partition, with capped backoff, until it answers again: nothing valid is
  dead-lettered by an outage; lost races (deadlock, serialization) are retried until they
  win; a failure that persists while the database answers is retried a bounded number of
  times, then dead-lettered; a :class:`RejectedEvent` (illegal in the domain) is
  dead-lettered at once.

Messages of one partition are handled one after the other, which keeps per-key order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import Context
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.security import parse_security
from faststream.kafka.subscriber.usecase import BatchSubscriber
from faststream.security import BaseSecurity, SASLScram256, SASLScram512
from omni_contracts.base import Event
from omni_contracts.catalogue import EVENT_TYPES
from omni_contracts.envelope import Envelope, EnvelopeError, PayloadError, decode, parse_envelope
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from omni_common.faults import (
    Backoff,
    HealthCheck,
    is_contention,
    is_infrastructure_error,
    wait_until_healthy,
)
from omni_common.metrics import PlatformMetrics
from omni_common.outbox import OutboxMessage
from omni_common.producer import PRODUCER_MAX_REQUEST_SIZE, ProducerOptions, producer_options
from omni_common.settings import ServiceSettings

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("omni_common.kafka")

EventHandler = Callable[[Any, Envelope], Awaitable[None]]
"""A handler: ``async def handle(event, envelope) -> None``."""


def only_when(relevant: Callable[[Any], bool], handler: EventHandler) -> EventHandler:
    """``handler`` for the events ``relevant`` accepts; the others are consumed untouched.

    For events that change nothing in this service (an anonymous store sale, an order born
    completed): no transaction and no inbox record, which a resend cannot change either.
    """

    async def handle(event: Any, envelope: Envelope) -> None:
        if relevant(event):
            await handler(event, envelope)

    handle.__name__ = getattr(handler, "__name__", "handle")
    handle.__doc__ = handler.__doc__
    return handle


# Fetch waits per broker (see ``KafkaRuntime.fetch_max_wait_ms``). Kafka's own client waits
# 500 ms, but it keeps fetch sessions (an empty answer names no partition); aiokafka sends
# and parses every partition each time, so it waits longer: 1 s halved the idle stack's CPU.
# The wait delays only partitions that join an in-flight fetch late (resumed, reassigned).
KAFKA_FETCH_MAX_WAIT_MS = 1000
TANSU_FETCH_MAX_WAIT_MS = 5
# How often aiokafka's fetch loop wakes when nothing happens (its default, 200 ms, is an
# idle consumer's main cost). Fetch answers, consumed records, resumed partitions and
# rebalances wake it anyway.
CONSUMER_IDLE_WAKE_MS = 1000


class _FetchingSubscriber(BatchSubscriber):
    """FastStream's batch subscriber, without its sleep after an empty poll.

    Its poll already waits (up to ``CONSUMER_IDLE_WAKE_MS``) for records and returns as soon
    as some arrive; the sleep it adds after an empty one would hold back the first record
    after a quiet spell. One call of the consume path per fetch instead of per record.
    """

    __slots__ = ()

    async def get_msg(self, consumer: Any) -> tuple[ConsumerRecord[Any, Any], ...]:
        """Everything fetched so far, waiting up to ``CONSUMER_IDLE_WAKE_MS`` for some."""
        fetched = await consumer.getmany(timeout_ms=CONSUMER_IDLE_WAKE_MS)
        return tuple(record for records in fetched.values() for record in records)


def _consumer_span_context(record: ConsumerRecord[Any, Any]) -> otel_context.Context:
    """A context holding this record's consumer span, child of its producer's trace."""
    carrier: dict[str, str] = {}
    for key, value in record.headers or ():
        if key in ("traceparent", "tracestate") and isinstance(value, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                carrier[key] = value.decode()
    parent = propagate.extract(carrier)
    span = _tracer.start_span(
        f"{record.topic} process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation": "process",
            "messaging.destination.name": record.topic,
            "messaging.kafka.destination.partition": record.partition,
            "messaging.kafka.message.offset": record.offset,
        },
    )
    # Ended at once, like the producer's: it marks the hand-over, and the handling's spans
    # are its children.
    span.end()
    return trace.set_span_in_context(span, parent)


UNSTORABLE: tuple[type[Exception], ...] = (
    asyncpg.DataError,  # SQLSTATE class 22: out of range, NUL in text, too long, ...
    asyncpg.exceptions._base.DataError,  # asyncpg refused to encode an argument
    asyncpg.CheckViolationError,
)
"""Database errors that say the value itself is wrong (HTTP answers them 422)."""


class RejectedEvent(Exception):
    """A valid event that the domain refuses (unknown SKU, illegal state change, ...).

    Raising it sends the message to the DLQ with this reason at once: retrying cannot help.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


Prepare = Callable[[asyncpg.Connection, Sequence[Event]], Awaitable[None]]
"""``async def prepare(conn, events)``: see :attr:`Subscription.prepare`."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """What one service consumes from one topic: a handler per event type.

    ``together``: waiting events may be handled in one transaction. Say False (or, per
    event, a predicate) when handlers lock shared rows in an order that ``prepare`` cannot
    take first (stock of the SKUs an order's reservation holds, read by the handler): two
    runs could lock them in opposite orders and deadlock, each waiting a second for
    PostgreSQL to notice. An event the predicate refuses is handled alone, in its order.
    """

    topic: str
    handlers: Mapping[type[Event], EventHandler]
    purpose: str = "main"
    together: bool | Callable[[Event], bool] = True
    prepare: Prepare | None = None
    """Called first in the transaction of a run handled together, with the run's events:
    take there, in one global order, every lock the handlers will take (stock of the SKUs
    the events name), so runs of different partitions cannot deadlock."""


@dataclass(slots=True)
class Parsed:
    """A fetched record that holds a valid event, with the handler it goes to."""

    record: ConsumerRecord[Any, Any]
    topic: str
    event: Event
    envelope: Envelope
    handler: EventHandler
    trace_context: otel_context.Context
    together: bool = True  # may join a lot (``Subscription.together``)


def _alone(event: Event) -> bool:
    """``Subscription.together=False``: no event of the topic joins a lot."""
    return False


BatchTransaction = Callable[[], contextlib.AbstractAsyncContextManager[asyncpg.Connection]]
"""Opens the one transaction in which a partition's waiting events are handled together."""


def dlq_headers(
    record: ConsumerRecord[Any, Any], *, reason: str, error: str, service: str
) -> dict[str, str]:
    """The original headers plus the ``dlq_*`` headers CONTRACT.md names."""
    headers: dict[str, str] = {}
    for key, value in record.headers or ():
        with contextlib.suppress(UnicodeDecodeError):
            headers[key] = value.decode() if isinstance(value, bytes) else str(value)
    headers.update(
        {
            "dlq_reason": reason,
            "dlq_error": error[:2000],
            "dlq_source_topic": record.topic,
            "dlq_source_partition": str(record.partition),
            "dlq_source_offset": str(record.offset),
            "dlq_service": service,
        }
    )
    return headers


def _encoded(headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
    return [(key, value.encode()) for key, value in headers.items()]


async def _whole_message(message: KafkaMessage) -> KafkaMessage:
    """Hand the message over as the body, undecoded: validation (and the DLQ on failure)
    happens here. Taken as the body rather than asked for from FastStream's context, whose
    resolution runs in a worker thread for every message."""
    return message


def broker_security(settings: ServiceSettings) -> BaseSecurity | None:
    """The FastStream security options for the configured Kafka listener."""
    protocol = settings.kafka_security_protocol.upper()
    if protocol == "PLAINTEXT":
        return None
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if protocol == "SSL":
        return BaseSecurity(ssl_context=context, use_ssl=True)
    if protocol != "SASL_SSL":
        raise ValueError(f"KAFKA_SECURITY_PROTOCOL {protocol!r} is not PLAINTEXT, SSL or SASL_SSL")
    if not settings.kafka_sasl_username or settings.kafka_sasl_password is None:
        raise ValueError("SASL_SSL needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
    mechanisms = {"SCRAM-SHA-512": SASLScram512, "SCRAM-SHA-256": SASLScram256}
    try:
        mechanism = mechanisms[settings.kafka_sasl_mechanism.upper()]
    except KeyError:
        raise ValueError(
            f"KAFKA_SASL_MECHANISM {settings.kafka_sasl_mechanism!r}"
            f" is not one of {sorted(mechanisms)}"
        ) from None
    return mechanism(
        settings.kafka_sasl_username,
        settings.kafka_sasl_password.get_secret_value(),
        ssl_context=context,
        use_ssl=True,
    )


class OffsetCommitter:
    """Commits the offsets of handled messages, per partition, in the background.

    Committing after every message costs a broker round trip per message (and FastStream's
    ack commits every assigned partition). Handled offsets are instead committed every
    ``interval_s``: still only after the effect is durable, and a crash redelivers at most
    one interval's worth, which the inbox turns into no-ops.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._pending: dict[Any, dict[TopicPartition, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._has_pending = asyncio.Event()

    def handled(self, consumer: Any, record: ConsumerRecord[Any, Any]) -> None:
        """Note that ``record`` (and everything before it in its partition) is done."""
        offsets = self._pending.setdefault(consumer, {})
        offsets[TopicPartition(record.topic, record.partition)] = record.offset + 1
        self._has_pending.set()

    async def flush(
        self, only_consumer: Any = None, only: set[TopicPartition] | None = None
    ) -> None:
        """Commit everything handled so far (or only ``only`` partitions of one consumer)."""
        if only_consumer is None:
            pending, self._pending = self._pending, {}
        else:
            mine = self._pending.get(only_consumer, {})
            taken = {tp: o for tp, o in mine.items() if only is None or tp in only}
            for tp in taken:
                del mine[tp]
            if not mine:
                self._pending.pop(only_consumer, None)
            pending = {only_consumer: taken} if taken else {}
        for consumer, offsets in pending.items():
            if not offsets:
                continue  # aiokafka refuses an empty commit
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError):
                # Partitions moved to another member: it resumes from the last commit and
                # the inbox absorbs the redelivery.
                log.info("offsets not committed after a rebalance: %s", offsets)
            except KafkaError:
                log.warning("offset commit failed; will retry", exc_info=True)
                again = self._pending.setdefault(consumer, {})
                for tp, offset in offsets.items():
                    again[tp] = max(offset, again.get(tp, 0))

    def start(self) -> None:
        """Commit periodically in the background."""
        self._task = asyncio.create_task(self._run(), name="offset-committer")

    async def stop(self) -> None:
        """Stop the background commits and commit what is left."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await self._has_pending.wait()  # idle: no wake-ups
            await asyncio.sleep(self.interval_s)
            self._has_pending.clear()
            await self.flush()
            if self._pending:  # a failed commit put offsets back
                self._has_pending.set()


@dataclass(slots=True)
class _Waiting:
    """A fetched message waiting in its partition's queue."""

    record: ConsumerRecord[Any, Any]
    trace_context: otel_context.Context
    # Put back after a lot it was in rolled back: handled alone from now on, so a failure
    # stays with its own event.
    alone: bool = False


class PartitionWorker:
    """Handles one partition's messages one after the other (per-key order).

    Partitions are handled concurrently: a message waiting on the database no longer holds
    up the other partitions. The fetch loop never waits on a worker: when a partition has
    ``queue_size`` messages waiting, that partition alone is paused at the consumer (what
    aiokafka had buffered for it is dropped and fetched again on resume), and resumed once
    its queue has drained to half. If a message cannot even be dead-lettered, the worker
    drops what it has queued and rewinds the partition to that message, so nothing is
    skipped.

    A worker about to handle its valid events also takes those waiting in idle partitions of
    the same topic (its ``neighbours``): one transaction for all of them. Under load the lots
    grow with the backlog, so the cost of a transaction is shared by more events the busier
    the service is. A partition lent to a lot is not handled by its own worker until the
    lot is done; if the lot rolls back, its events go back to the front of their own queue,
    to be handled alone.
    """

    def __init__(
        self,
        runtime: KafkaRuntime,
        consumer: Any,
        tp: TopicPartition,
        by_physical: Mapping[str, tuple[str, str, Mapping[str, Any]]],
        queue_size: int,
        neighbours: list[PartitionWorker] | None = None,
    ) -> None:
        self.runtime = runtime
        self.consumer = consumer
        self.tp = tp
        self.by_physical = by_physical
        self.queue_size = queue_size
        # Unbounded on purpose: the bound is kept by pausing the partition, never by making
        # the shared fetch loop wait. Each message keeps the trace context it arrived in.
        self.queue: collections.deque[_Waiting] = collections.deque()
        self._wake = asyncio.Event()
        self.paused = False
        self.resume_at: int | None = None
        self.busy = False  # handling its own messages
        self.lent = False  # its messages are in another worker's lot
        self._free = asyncio.Event()  # neither busy nor lent
        self._free.set()
        self.stopping = False
        self.neighbours = neighbours if neighbours is not None else []
        self.neighbours.append(self)
        service, topic = runtime.metrics.service, by_physical[tp.topic][0]
        self.topic = topic
        self._handling_seconds = runtime.metrics.event_handling.labels(service, topic)
        self._rewinds = runtime.metrics.consumer_rewinds.labels(service, topic)
        # A fresh context: the worker must not inherit the first message's trace.
        self.task = asyncio.create_task(
            self._run(), name=f"partition-worker-{tp.topic}-{tp.partition}", context=Context()
        )

    def offer(self, record: ConsumerRecord[Any, Any], trace_context: otel_context.Context) -> None:
        """Queue a fetched record (never blocks); pause the partition when full."""
        self.queue.append(_Waiting(record, trace_context))
        self._wake.set()
        if not self.paused and len(self.queue) >= self.queue_size:
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                self.consumer.pause(self.tp)
                self.paused = True
                self.runtime.metrics.partitions_paused.labels(
                    self.runtime.metrics.service, self.tp.topic
                ).inc()

    def _maybe_resume(self) -> None:
        if self.paused and len(self.queue) <= self.queue_size // 2:
            self.paused = False
            with contextlib.suppress(IllegalStateError):
                self.consumer.resume(self.tp)

    def _set_free(self) -> None:
        if self.busy or self.lent:
            self._free.clear()
        else:
            self._free.set()

    async def _run(self) -> None:
        while not self.stopping:
            if not self.queue or self.lent:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.busy = True
            self._set_free()
            try:
                await self._handle(self._take())
            finally:
                self.busy = False
                self._set_free()

    def _take(self) -> list[_Waiting]:
        # What is already waiting is handled with the first: one transaction for the lot.
        # Messages put back alone are taken alone.
        first = self.queue.popleft()
        taken = [first]
        if not first.alone:
            limit = self.runtime.settings.consumer_batch_max
            while len(taken) < limit and self.queue and not self.queue[0].alone:
                taken.append(self.queue.popleft())
        self._maybe_resume()
        return taken

    async def _handle(self, taken: list[_Waiting]) -> None:
        """Handle fetched messages in order: runs of valid events together, the rest alone."""
        run: list[Parsed] = []
        alone = taken[0].alone
        for waiting in taken:
            record = waiting.record
            if self.resume_at is not None:
                if record.offset != self.resume_at:
                    continue  # fetched before the rewind: it comes again
                self.resume_at = None
            parsed = self._parse(record, waiting.trace_context)
            if parsed is not None and parsed.together:
                run.append(parsed)
                continue
            if not await self._handle_run(run, alone):
                return
            run = []
            if parsed is not None:  # a valid event that is handled alone
                if not await self._handle_run([parsed], alone=True):
                    return
                continue
            # Not a valid event for a handler (tombstone, skipped, to dead-letter): what
            # came before it went first, then it alone.
            topic, consumer_name, handlers = self.by_physical[record.topic]
            if not await self._guarded(
                record,
                waiting.trace_context,
                self.runtime.consume_record(record, topic, consumer_name, handlers),
            ):
                return
        await self._handle_run(run, alone)

    def _parse(
        self, record: ConsumerRecord[Any, Any], trace_context: otel_context.Context
    ) -> Parsed | None:
        topic, _, handlers = self.by_physical[record.topic]
        return self.runtime.parse(record, topic, handlers, trace_context)

    async def _handle_run(self, run: list[Parsed], alone: bool = False) -> bool:
        """Handle valid events, together when there are several; False after a rewind."""
        if not run:
            return True
        started = time.perf_counter()
        if not alone and self.runtime.can_handle_together():
            lenders = self._borrow(self.runtime.settings.consumer_batch_max - len(run))
            lot = run + [parsed for _, taken in lenders for _, parsed in taken]
            together = False
            try:
                together = len(lot) > 1 and await self.runtime.handle_together(lot)
            finally:
                for lender, taken in lenders:
                    if together:
                        self.runtime.committer.handled(lender.consumer, taken[-1][1].record)
                    else:  # back to the front of its own queue, to be handled alone
                        for waiting, _ in reversed(taken):
                            waiting.alone = True
                            lender.queue.appendleft(waiting)
                    lender._give_back()
            if together:
                self._handling_seconds.observe(time.perf_counter() - started)
                self.runtime.committer.handled(self.consumer, run[-1].record)
                return True
        # Alone (or the lot failed and rolled back): each with its own retries and DLQ.
        for parsed in run:
            if self.resume_at is not None:
                return False
            started = time.perf_counter()
            handled = self.runtime.handle_parsed(parsed)
            if not await self._guarded(parsed.record, parsed.trace_context, handled):
                return False
            self._handling_seconds.observe(time.perf_counter() - started)
        return True

    def _borrow(self, room: int) -> list[tuple[PartitionWorker, list[tuple[_Waiting, Parsed]]]]:
        """Take the valid events waiting in idle neighbours, up to ``room`` of them.

        No await in here: a neighbour seen idle stays idle until it is marked lent.
        """
        lenders: list[tuple[PartitionWorker, list[tuple[_Waiting, Parsed]]]] = []
        for other in self.neighbours:
            if room <= 0:
                break
            if (
                other is self
                or other.busy
                or other.lent
                or other.stopping
                or other.resume_at is not None
                or not other.queue
            ):
                continue
            taken: list[tuple[_Waiting, Parsed]] = []
            while other.queue and len(taken) < room and not other.queue[0].alone:
                waiting = other.queue[0]
                parsed = other._parse(waiting.record, waiting.trace_context)
                if parsed is None or not parsed.together:
                    break  # its own worker handles it alone, in order
                taken.append((other.queue.popleft(), parsed))
            if taken:
                other.lent = True
                other._set_free()
                other._maybe_resume()
                lenders.append((other, taken))
                room -= len(taken)
        return lenders

    def _give_back(self) -> None:
        self.lent = False
        self._set_free()
        self._wake.set()

    async def _guarded(
        self,
        record: ConsumerRecord[Any, Any],
        trace_context: otel_context.Context,
        work: Awaitable[None],
    ) -> bool:
        """Run ``work`` for ``record`` in its trace; rewind to it if it could not even be
        dead-lettered (False: what was fetched after it comes again)."""
        token = otel_context.attach(trace_context)
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "could not handle or dead-letter %s[%d]@%d; rewinding",
                record.topic,
                record.partition,
                record.offset,
            )
            self._rewinds.inc()
            self._rewind(record)
            await asyncio.sleep(self.runtime.settings.handler_backoff_max_s)
            return False
        finally:
            otel_context.detach(token)
        self.runtime.committer.handled(self.consumer, record)
        return True

    def _rewind(self, record: ConsumerRecord[Any, Any]) -> None:
        # No await between dropping the queue and the seek: nothing slips in between.
        self.queue.clear()
        self.resume_at = record.offset
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile: the new owner has it
            self.consumer.seek(self.tp, record.offset)
        self._maybe_resume()

    async def stop(self, grace_s: float) -> None:
        """Finish the messages in hand, its own or lent (up to ``grace_s``); what is
        queued comes again."""
        self.stopping = True
        with contextlib.suppress(ValueError):
            self.neighbours.remove(self)
        if not self._free.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._free.wait(), grace_s)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.queue.clear()


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Drops revoked partitions' workers and commits what they handled before letting go.

    aiokafka awaits ``on_partitions_revoked`` before the group rebalances, while this member
    still owns the partitions, so the commit lands and the new owner starts right after the
    last handled message (the inbox absorbs anything handled but not yet committed).
    """

    def __init__(self, runtime: KafkaRuntime) -> None:
        self.runtime = runtime
        self.subscriber: Any = None  # set once FastStream has built the subscriber

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop the revoked partitions' workers, then commit their handled offsets."""
        consumer = getattr(self.subscriber, "consumer", None)
        if consumer is None or not revoked:
            return
        await self.runtime.drop_partitions(consumer, revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Nothing to do: workers start with the first message of a partition."""


class KafkaRuntime:
    """A service's FastStream broker with its subscriptions, DLQ publishing and metrics."""

    def __init__(self, settings: ServiceSettings, metrics: PlatformMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._security = broker_security(settings)
        self.broker = KafkaBroker(
            settings.kafka_bootstrap_servers,
            client_id=settings.service_name,
            security=self._security,
            # Safe on any broker; connect() turns idempotence on where the broker has it.
            acks="all",
            enable_idempotence=False,
            max_request_size=PRODUCER_MAX_REQUEST_SIZE,
            # No middlewares: per fetched batch they would see a batch, not an event. The
            # dispatcher makes each record's consumer span; the partition workers count
            # (omni_events_handled, omni_event_handling_seconds, omni_consumer_rewinds).
            logger=logging.getLogger(f"faststream.{settings.service_name}"),
        )
        # Contract topic names (unprefixed), for the ACLs and the AsyncAPI document.
        self.consumes: set[str] = set()
        self.produces: set[str] = set()
        self.reads: set[str] = set()
        # purpose -> contract topic -> (inbox consumer name, ce_type -> (model, handler))
        self._routes: dict[
            str, dict[str, tuple[str, Mapping[str, tuple[type[Event], EventHandler]]]]
        ] = {}
        self._lag_task: asyncio.Task[None] | None = None
        self.committer = OffsetCommitter(settings.consumer_commit_interval_ms / 1000)
        self._workers: dict[tuple[int, str, int], PartitionWorker] = {}
        # The workers of one consumer's partitions of one topic, which lend each other
        # their waiting events (see PartitionWorker).
        self._neighbours: dict[tuple[int, str], list[PartitionWorker]] = {}
        # Set by the service runtime: probes the database, to tell an outage (wait and
        # retry) from a message that fails on a healthy world (dead-letter it).
        self.health_check: HealthCheck | None = None
        self._prepare: dict[str, Prepare] = {}
        # Per topic, which events may join a lot (``Subscription.together``); absent: all.
        self._joins_lot: dict[str, Callable[[Event], bool]] = {}
        # Set by the service runtime: the transaction a run of events is handled in together.
        self.batch_transaction: BatchTransaction | None = None
        self._draining = False
        self.producer_options: ProducerOptions | None = None
        self._producer: AIOKafkaProducer | None = None

    # -- wiring ---------------------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> None:
        """Consume ``subscription.topic`` in this service's consumer group."""
        topic = subscription.topic
        routes = self._routes.setdefault(subscription.purpose, {})
        if topic in routes:
            raise ValueError(f"{topic} is already subscribed for {subscription.purpose!r}")
        self.consumes.add(topic)
        self.produces.add(f"{topic}.dlq")
        handlers = {model.ce_type: (model, h) for model, h in subscription.handlers.items()}
        if subscription.together is False:
            self._joins_lot[topic] = _alone
        elif callable(subscription.together):
            self._joins_lot[topic] = subscription.together
        if subscription.prepare is not None:
            self._prepare[topic] = subscription.prepare
        consumer_name = f"{self.settings.service_name}.{subscription.purpose}:{topic}"
        routes[topic] = (consumer_name, handlers)

    def _register_consumers(self) -> None:
        # One consumer per purpose reads all of its topics: every extra member of a group
        # costs a rebalance of the whole group (seconds on Tansu, and on Kafka under load).
        s = self.settings
        for purpose, routes in self._routes.items():
            by_physical = {s.topic(t): (t, *route) for t, route in routes.items()}

            consume = self._dispatcher(by_physical)
            consume.__name__ = f"consume_{purpose}"
            consume.__doc__ = "; ".join(
                f"{t}: " + ", ".join(sorted(h)) for t, (_, h) in sorted(routes.items())
            )
            listener = RebalanceListener(self)
            subscriber = self.broker.subscriber(
                *by_physical,
                listener=listener,
                batch=True,
                group_id=s.group_id(purpose),
                ack_policy=AckPolicy.MANUAL,
                decoder=_whole_message,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.fetch_max_wait_ms(),
                consumer_timeout_ms=CONSUMER_IDLE_WAKE_MS,
                session_timeout_ms=s.consumer_session_timeout_ms,
                heartbeat_interval_ms=s.consumer_heartbeat_interval_ms,
                title=f"{s.service_name}:{purpose}",
                description=consume.__doc__,
            )
            # Same layout, one method overridden (FastStream offers no subscriber class hook).
            subscriber.__class__ = _FetchingSubscriber
            subscriber(consume)
            listener.subscriber = subscriber

    def fetch_max_wait_ms(self) -> int:
        """The consumers' fetch wait: as configured, else chosen for the broker connected to.

        Apache Kafka answers a fetch as soon as data arrives, so its long wait costs no
        latency and spares the CPU of empty fetches; Tansu holds an empty fetch for the whole
        wait, so it gets a short one. A broker that hands out producer ids is taken for
        Apache Kafka (Tansu does not).
        """
        if self.settings.consumer_fetch_max_wait_ms is not None:
            return self.settings.consumer_fetch_max_wait_ms
        options = self.producer_options
        kafka = options is not None and options.enable_idempotence
        return KAFKA_FETCH_MAX_WAIT_MS if kafka else TANSU_FETCH_MAX_WAIT_MS

    def _dispatcher(
        self, by_physical: Mapping[str, tuple[str, str, Mapping[str, Any]]]
    ) -> Callable[[KafkaMessage], Awaitable[None]]:
        linger_s = self.settings.consumer_linger_ms / 1000

        # A closure, not a default argument: FastStream would take one for a body field.
        async def consume(message: Any) -> None:
            if self._draining:
                return  # shutting down: not handled, not committed, so it comes again
            consumer = message.consumer
            for record in message.raw_message:
                key = (id(consumer), record.topic, record.partition)
                worker = self._workers.get(key)
                if worker is None:
                    worker = self._workers[key] = PartitionWorker(
                        self,
                        consumer,
                        TopicPartition(record.topic, record.partition),
                        by_physical,
                        self.settings.consumer_queue_size,
                        self._neighbours.setdefault((id(consumer), record.topic), []),
                    )
                # Never waits: a busy partition is paused alone, the others keep flowing.
                worker.offer(record, _consumer_span_context(record))
            if linger_s:
                await self._linger(consumer, linger_s)

        return consume

    async def _linger(self, consumer: Any, seconds: float) -> None:
        """Fetch nothing for ``seconds``: what arrives meanwhile comes in one fetch, to be
        handled as one lot. Only after records came, so a quiet consumer never waits."""
        held = consumer.assignment() - consumer.paused()
        with contextlib.suppress(IllegalStateError):  # a rebalance took some meanwhile
            consumer.pause(*held)
        await asyncio.sleep(seconds)
        if self._draining:
            return  # stays paused: the drain stops fetching
        for tp in held:
            worker = self._workers.get((id(consumer), tp.topic, tp.partition))
            if worker is not None and worker.paused:
                continue  # its worker resumes it once its queue has drained
            with contextlib.suppress(IllegalStateError):
                consumer.resume(tp)

    async def drop_partitions(self, consumer: Any, revoked: set[TopicPartition]) -> None:
        """Stop the workers of ``revoked`` partitions and commit what they handled."""
        keys = [
            key
            for key, worker in self._workers.items()
            if worker.consumer is consumer and worker.tp in revoked
        ]
        workers = [self._workers.pop(key) for key in keys]
        # Bounded: the rebalance waits for this, and the group for the rebalance.
        grace_s = self.settings.consumer_revoke_grace_s
        await asyncio.gather(*(w.stop(grace_s=grace_s) for w in workers))
        await self.committer.flush(consumer, revoked)
        if workers:
            log.info("dropped %d revoked partition worker(s)", len(workers))

    def handled_event_types(self) -> dict[str, frozenset[str]]:
        """Contract topic -> the ``ce_type`` values this service handles there (all purposes)."""
        handled: dict[str, set[str]] = {}
        for routes in self._routes.values():
            for topic, (_, handlers) in routes.items():
                handled.setdefault(topic, set()).update(handlers)
        return {topic: frozenset(types) for topic, types in handled.items()}

    def declare_output(self, topic: str) -> None:
        """Declare that this service publishes to ``topic`` (through its outbox)."""
        self.produces.add(topic)

    def declare_read(self, topic: str) -> None:
        """Declare that this service reads ``topic`` outside its consumer group (a feed)."""
        self.reads.add(topic)

    # -- consuming ------------------------------------------------------------------------

    def parse(
        self,
        record: ConsumerRecord[Any, Any],
        topic: str,
        handlers: Mapping[str, tuple[type[Event], EventHandler]],
        trace_context: otel_context.Context,
    ) -> Parsed | None:
        """The valid event in ``record`` and its handler; None for anything else (a
        tombstone, an event skipped or to dead-letter), which :meth:`consume_record` takes."""
        if record.value is None:
            return None
        try:
            envelope = parse_envelope(record.headers or ())
        except EnvelopeError:
            return None
        entry = handlers.get(envelope.type)
        if entry is None:
            return None
        model, handler = entry
        try:
            event = decode(model, record.value)
        except PayloadError:
            return None
        joins = self._joins_lot.get(topic)
        together = joins is None or joins(event)
        return Parsed(record, topic, event, envelope, handler, trace_context, together)

    async def handle_parsed(self, parsed: Parsed) -> None:
        """Handle one valid event alone, with retries, waits and the DLQ."""
        await self._handle_with_retries(
            parsed.record, parsed.topic, parsed.event, parsed.envelope, parsed.handler
        )

    def can_handle_together(self) -> bool:
        """Whether this service handles waiting events in one transaction at all (which of
        them may join a lot is each event's ``Parsed.together``)."""
        return self.batch_transaction is not None

    async def handle_together(self, run: list[Parsed]) -> bool:
        """Handle waiting events of one topic in one transaction; False if the lot failed.

        One commit (and one outbox write) for the lot instead of one per event. If any
        handler fails, the whole transaction rolls back and the caller handles them one by
        one, so a failure stays with its own event (retried, waited out, or dead-lettered).
        """
        if self.batch_transaction is None:
            return False
        m = self.metrics
        try:
            async with self.batch_transaction() as conn:
                if (prepare := self._prepare.get(run[0].topic)) is not None:
                    await prepare(conn, [parsed.event for parsed in run])
                for parsed in run:
                    token = otel_context.attach(parsed.trace_context)
                    try:
                        await parsed.handler(parsed.event, parsed.envelope)
                    finally:
                        otel_context.detach(token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            m.batches_split.labels(m.service, run[0].topic).inc()
            log.info(
                "%d events of %s[%d] could not be handled together (%s); one by one",
                len(run),
                run[0].record.topic,
                run[0].record.partition,
                type(exc).__name__,
            )
            return False
        m.batch_size.labels(m.service, run[0].topic).observe(len(run))
        for parsed in run:
            m.events_handled.labels(m.service, parsed.topic, parsed.envelope.type, "handled").inc()
        return True

    async def consume_record(
        self,
        record: ConsumerRecord[Any, Any],
        topic: str,
        consumer_name: str,
        handlers: Mapping[str, tuple[type[Event], EventHandler]],
    ) -> None:
        """Validate one record and hand it to its handler; dead-letter what cannot be handled."""
        m = self.metrics
        if record.value is None and record.key is not None:
            # A tombstone on a compacted topic: the key was forgotten, there is no event.
            m.events_handled.labels(m.service, topic, "tombstone", "ignored").inc()
            return
        try:
            envelope = parse_envelope(record.headers or ())
        except EnvelopeError as exc:
            await self._dead_letter(record, topic, "invalid_envelope", str(exc))
            return
        entry = handlers.get(envelope.type)
        if entry is None:
            if envelope.type in EVENT_TYPES and EVENT_TYPES[envelope.type].topic == topic:
                # A contract event this service has no interest in: skip it.
                m.events_handled.labels(m.service, topic, envelope.type, "ignored").inc()
                return
            await self._dead_letter(
                record, topic, "unknown_event_type", f"ce_type {envelope.type!r} is not in {topic}"
            )
            return
        model, handler = entry
        try:
            event = decode(model, record.value)
        except PayloadError as exc:
            reason = "malformed_json" if str(exc).startswith("malformed") else "schema_violation"
            await self._dead_letter(record, topic, reason, str(exc), envelope.type)
            return
        await self._handle_with_retries(record, topic, event, envelope, handler)

    async def _handle_with_retries(
        self,
        record: ConsumerRecord[Any, Any],
        topic: str,
        event: Event,
        envelope: Envelope,
        handler: EventHandler,
    ) -> None:
        """Handle until it succeeds, the domain refuses, or it keeps failing on a healthy world.

        A failure while the database (or broker) does not answer is the world's fault: this
        partition waits, with capped backoff, until it answers again, and the attempt is not
        counted. Lost races (serialization failure, deadlock, lock timeout) are retried until
        they win. Only a failure that persists over ``handler_max_attempts`` while the
        infrastructure is healthy dead-letters the message.
        """
        s, m = self.settings, self.metrics
        backoff = Backoff(s.handler_backoff_initial_s, s.handler_backoff_max_s)
        attempt = 0
        while True:
            try:
                await handler(event, envelope)
            except RejectedEvent as exc:
                log.warning("rejected %s %s: %s", envelope.type, envelope.id, exc)
                await self._dead_letter(record, topic, exc.reason, str(exc), envelope.type)
                return
            except UNSTORABLE as exc:
                # A value no column can hold: retrying cannot help.
                log.warning("unstorable %s %s: %s", envelope.type, envelope.id, type(exc).__name__)
                await self._dead_letter(
                    record, topic, "unstorable_value", type(exc).__name__, envelope.type
                )
                return
            except Exception as exc:
                m.handler_retries.labels(m.service, topic).inc()
                if is_infrastructure_error(exc) and (problem := await self._unhealthy()):
                    log.warning(
                        "%s %s waits for the infrastructure (%s): %r",
                        envelope.type,
                        envelope.id,
                        problem,
                        exc,
                    )
                    await self._wait_until_healthy(topic, record)
                    attempt = 0  # the outage was not the message's fault
                    backoff.reset()
                    continue
                if is_contention(exc):
                    log.info("retrying %s %s after contention: %r", envelope.type, envelope.id, exc)
                    await backoff.sleep()
                    continue
                attempt += 1
                if attempt >= s.handler_max_attempts:
                    if problem := await self._unhealthy():
                        await self._wait_until_healthy(topic, record)
                        attempt = 0
                        backoff.reset()
                        continue
                    log.exception(
                        "giving up on %s %s after %d attempts", envelope.type, envelope.id, attempt
                    )
                    await self._dead_letter(
                        record,
                        topic,
                        "handler_failed",
                        f"{type(exc).__name__}: {exc} (after {attempt} attempts)",
                        envelope.type,
                    )
                    return
                log.warning(
                    "retrying %s %s (attempt %d): %r", envelope.type, envelope.id, attempt, exc
                )
                await backoff.sleep()
            else:
                m.events_handled.labels(m.service, topic, envelope.type, "handled").inc()
                return

    async def _unhealthy(self) -> str | None:
        """Why the infrastructure is unwell, or None (also None without a health check)."""
        if self.health_check is None:
            return None
        try:
            return await self.health_check()
        except Exception as exc:  # a probe that cannot even run says the same
            return f"{type(exc).__name__}: {exc}"

    async def _wait_until_healthy(self, topic: str, record: ConsumerRecord[Any, Any]) -> None:
        s, m = self.settings, self.metrics
        m.infrastructure_waits.labels(m.service, topic).inc()
        backoff = Backoff(s.handler_backoff_initial_s, s.handler_backoff_max_s)
        await wait_until_healthy(
            self._unhealthy, backoff, f"{record.topic}[{record.partition}]@{record.offset}"
        )

    async def _dead_letter(
        self,
        record: ConsumerRecord[Any, Any],
        topic: str,
        reason: str,
        error: str,
        ce_type: str = "unknown",
    ) -> None:
        m = self.metrics
        log.warning(
            "dead-lettering %s[%d]@%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            error,
        )
        # Awaited: if the DLQ write fails, the exception nacks the message (the partition
        # rewinds and it is tried again) rather than committing past it.
        sent = await self.producer.send(
            self.settings.topic(f"{topic}.dlq"),
            value=record.value or b"",
            key=record.key,
            headers=_encoded(dlq_headers(record, reason=reason, error=error, service=m.service)),
        )
        await sent
        m.dlq_messages.labels(m.service, topic, reason).inc()
        m.events_handled.labels(m.service, topic, ce_type, "dead_lettered").inc()

    # -- publishing (the outbox relay's side) ---------------------------------------------

    @property
    def producer(self) -> AIOKafkaProducer:
        """The service's one producer (outbox relay and DLQ alike), once connected."""
        if self._producer is None:
            raise RuntimeError("the Kafka runtime is not connected")
        return self._producer

    async def publish_outbox_message(self, message: OutboxMessage) -> Awaitable[object]:
        """Send one outbox row; returns the broker acknowledgement to await.

        Straight to aiokafka: the row already carries its trace context and CloudEvents
        headers, and FastStream's per-message publish middlewares cost more than the send
        itself (``omni_outbox_published`` counts what left).
        """
        destination = self.settings.topic(message.topic)
        # A producer span of our own, child of the row's trace: the consumer's span continues
        # from this one, as with FastStream's middleware (started and ended by hand, which
        # costs a fraction of a current-span context manager per message).
        span = _tracer.start_span(
            f"{destination} publish",
            context=propagate.extract(message.headers),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation": "publish",
                "messaging.destination.name": destination,
            },
        )
        headers = dict(message.headers)
        propagate.inject(headers, context=trace.set_span_in_context(span))
        try:
            return await self.producer.send(
                destination,
                value=message.payload,
                key=message.key.encode() if message.key is not None else None,
                headers=_encoded(headers),
            )
        finally:
            span.end()

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect the producer only (e.g. a process that runs just the outbox relay)."""
        await self._configure_producer()
        await self.broker.connect()
        await self._start_producer()

    async def _start_producer(self) -> None:
        if self._producer is not None:
            return
        assert self.producer_options is not None
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            client_id=self.settings.service_name,
            **self.producer_options.as_kwargs(),
            **parse_security(self._security),
        )
        await producer.start()
        self._producer = producer

    async def start(self) -> None:
        """Connect the broker, start the subscribers and the lag sampler."""
        self._draining = False
        await self._configure_producer()
        self._register_consumers()
        await self.broker.start()
        await self._start_producer()
        self.committer.start()
        self._lag_task = asyncio.create_task(self._sample_lag(), name="consumer-lag")

    async def drain(self, grace_s: float = 10.0) -> None:
        """Stop fetching, finish the messages in hand, commit: the first half of a shutdown.

        The broker stays connected, so the outbox relay can still publish; :meth:`stop`
        then leaves the groups.
        """
        if self._draining:
            return
        self._draining = True
        if self._lag_task:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None
        for subscriber in self.broker.subscribers:
            consumer = getattr(subscriber, "consumer", None)
            if consumer is not None:
                with contextlib.suppress(Exception):  # not yet joined: nothing assigned
                    consumer.pause(*consumer.assignment())
        # Workers finish what they hold (a bounded wait); their offsets are committed while
        # the consumers are still members; queued messages come again to the next owner.
        await asyncio.gather(*(w.stop(grace_s=grace_s) for w in self._workers.values()))
        self._workers.clear()
        self._neighbours.clear()
        await self.committer.stop()

    async def stop(self) -> None:
        """Drain (if not yet done), then leave the groups and disconnect."""
        await self.drain()
        await self.broker.stop()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def _configure_producer(self) -> None:
        # The one producer (outbox relay and DLQ alike) is built from the broker's connection
        # options when it connects: settle them first, per what this broker supports.
        options = await producer_options(
            self.settings.kafka_bootstrap_servers, **parse_security(self._security)
        )
        self.producer_options = options
        # FastStream keeps the producer's options until it connects, and offers no setter.
        connection = getattr(self.broker, "_connection_kwargs", None)
        if isinstance(connection, dict):
            connection.update(options.as_kwargs())
        else:
            log.warning("producer: cannot set idempotence on this FastStream; acks=all only")

    async def _sample_lag(self, every_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            for subscriber in self.broker.subscribers:
                consumer = getattr(subscriber, "consumer", None)
                if consumer is None:
                    continue
                group = getattr(consumer, "_group_id", None) or ""
                try:
                    for tp in consumer.assignment():
                        await self._record_lag(consumer, group, tp)
                except Exception:  # a rebalance in progress; next round
                    log.debug("lag sampling skipped", exc_info=True)

    async def _record_lag(self, consumer: Any, group: str, tp: TopicPartition) -> None:
        m = self.metrics
        highwater = consumer.highwater(tp)
        if highwater is None:
            return
        position = await consumer.position(tp)
        m.consumer_lag.labels(m.service, group, tp.topic, str(tp.partition)).set(
            max(highwater - position, 0)
        )
