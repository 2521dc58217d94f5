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
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from contextvars import Context
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from faststream.kafka.security import parse_security
from faststream.security import BaseSecurity, SASLScram256, SASLScram512
from omni_contracts.base import Event
from omni_contracts.catalogue import EVENT_TYPES
from omni_contracts.envelope import Envelope, EnvelopeError, PayloadError, decode, parse_envelope
from opentelemetry import context as otel_context

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

EventHandler = Callable[[Any, Envelope], Awaitable[None]]
"""A handler: ``async def handle(event, envelope) -> None``."""


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


@dataclass(frozen=True, slots=True)
class Subscription:
    """What one service consumes from one topic: a handler per event type."""

    topic: str
    handlers: Mapping[type[Event], EventHandler]
    purpose: str = "main"


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


async def _raw_body(message: KafkaMessage) -> bytes:
    """Hand the value over undecoded: validation (and the DLQ on failure) happens here."""
    return message.body


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

    def handled(self, consumer: Any, record: ConsumerRecord[Any, Any]) -> None:
        """Note that ``record`` (and everything before it in its partition) is done."""
        offsets = self._pending.setdefault(consumer, {})
        offsets[TopicPartition(record.topic, record.partition)] = record.offset + 1

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
            await asyncio.sleep(self.interval_s)
            await self.flush()


class PartitionWorker:
    """Handles one partition's messages one after the other (per-key order).

    Partitions are handled concurrently: a message waiting on the database no longer holds
    up the other partitions. The fetch loop never waits on a worker: when a partition has
    ``queue_size`` messages waiting, that partition alone is paused at the consumer (what
    aiokafka had buffered for it is dropped and fetched again on resume), and resumed once
    its queue has drained to half. If a message cannot even be dead-lettered, the worker
    drops what it has queued and rewinds the partition to that message, so nothing is
    skipped.
    """

    def __init__(
        self,
        runtime: KafkaRuntime,
        consumer: Any,
        tp: TopicPartition,
        by_physical: Mapping[str, tuple[str, str, Mapping[str, Any]]],
        queue_size: int,
    ) -> None:
        self.runtime = runtime
        self.consumer = consumer
        self.tp = tp
        self.by_physical = by_physical
        self.queue_size = queue_size
        # Unbounded on purpose: the bound is kept by pausing the partition, never by making
        # the shared fetch loop wait. Each message keeps the trace context it arrived in.
        self.queue: asyncio.Queue[tuple[KafkaMessage, otel_context.Context]] = asyncio.Queue()
        self.paused = False
        self.resume_at: int | None = None
        self.busy = False
        self.stopping = False
        # A fresh context: the worker must not inherit the first message's trace.
        self.task = asyncio.create_task(
            self._run(), name=f"partition-worker-{tp.topic}-{tp.partition}", context=Context()
        )

    def offer(self, message: KafkaMessage) -> None:
        """Queue a fetched message (never blocks); pause the partition when full."""
        self.queue.put_nowait((message, otel_context.get_current()))
        if not self.paused and self.queue.qsize() >= self.queue_size:
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                self.consumer.pause(self.tp)
                self.paused = True
                self.runtime.metrics.partitions_paused.labels(
                    self.runtime.metrics.service, self.tp.topic
                ).inc()

    def _maybe_resume(self) -> None:
        if self.paused and self.queue.qsize() <= self.queue_size // 2:
            self.paused = False
            with contextlib.suppress(IllegalStateError):
                self.consumer.resume(self.tp)

    async def _run(self) -> None:
        while not self.stopping:
            self.busy = False
            message, trace_context = await self.queue.get()
            self.busy = True
            self._maybe_resume()
            record = message.raw_message
            assert isinstance(record, ConsumerRecord)
            if self.resume_at is not None:
                if record.offset != self.resume_at:
                    continue  # fetched before the rewind: it comes again
                self.resume_at = None
            topic, consumer_name, handlers = self.by_physical[record.topic]
            token = otel_context.attach(trace_context)
            try:
                await self.runtime.consume_record(record, topic, consumer_name, handlers)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "could not handle or dead-letter %s[%d]@%d; rewinding",
                    record.topic,
                    record.partition,
                    record.offset,
                )
                self._rewind(record)
                await asyncio.sleep(self.runtime.settings.handler_backoff_max_s)
                continue
            finally:
                otel_context.detach(token)
            self.runtime.committer.handled(self.consumer, record)

    def _rewind(self, record: ConsumerRecord[Any, Any]) -> None:
        # No await between dropping the queue and the seek: nothing slips in between.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.resume_at = record.offset
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile: the new owner has it
            self.consumer.seek(self.tp, record.offset)
        self._maybe_resume()

    async def stop(self, grace_s: float) -> None:
        """Finish the message in hand (up to ``grace_s``); what is queued comes again."""
        self.stopping = True
        if self.busy:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), grace_s)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        while not self.queue.empty():
            self.queue.get_nowait()


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
            middlewares=[
                KafkaTelemetryMiddleware(),
                KafkaPrometheusMiddleware(
                    registry=metrics.registry, app_name=settings.service_name
                ),
            ],
            logger=logging.getLogger(f"faststream.{settings.service_name}"),
        )
        # Contract topic names (unprefixed), for the ACLs and the AsyncAPI document.
        self.consumes: set[str] = set()
        self.produces: set[str] = set()
        # purpose -> contract topic -> (inbox consumer name, ce_type -> (model, handler))
        self._routes: dict[
            str, dict[str, tuple[str, Mapping[str, tuple[type[Event], EventHandler]]]]
        ] = {}
        self._lag_task: asyncio.Task[None] | None = None
        self.committer = OffsetCommitter(settings.consumer_commit_interval_ms / 1000)
        self._workers: dict[tuple[int, str, int], PartitionWorker] = {}
        # Set by the service runtime: probes the database, to tell an outage (wait and
        # retry) from a message that fails on a healthy world (dead-letter it).
        self.health_check: HealthCheck | None = None
        self._draining = False
        self.producer_options: ProducerOptions | None = None

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
                group_id=s.group_id(purpose),
                ack_policy=AckPolicy.MANUAL,
                decoder=_raw_body,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=s.consumer_fetch_max_wait_ms,
                session_timeout_ms=s.consumer_session_timeout_ms,
                heartbeat_interval_ms=s.consumer_heartbeat_interval_ms,
                title=f"{s.service_name}:{purpose}",
                description=consume.__doc__,
            )
            subscriber(consume)
            listener.subscriber = subscriber

    def _dispatcher(
        self, by_physical: Mapping[str, tuple[str, str, Mapping[str, Any]]]
    ) -> Callable[[KafkaMessage], Awaitable[None]]:
        # A closure, not a default argument: FastStream would take one for a body field.
        async def consume(message: KafkaMessage) -> None:
            if self._draining:
                return  # shutting down: not handled, not committed, so it comes again
            record = message.raw_message
            assert isinstance(record, ConsumerRecord)
            key = (id(message.consumer), record.topic, record.partition)
            worker = self._workers.get(key)
            if worker is None:
                worker = self._workers[key] = PartitionWorker(
                    self,
                    message.consumer,
                    TopicPartition(record.topic, record.partition),
                    by_physical,
                    self.settings.consumer_queue_size,
                )
            # Never waits: a busy partition is paused alone, the others keep flowing.
            worker.offer(message)

        return consume

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

    # -- consuming ------------------------------------------------------------------------

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
        await self.broker.publish(
            record.value or b"",
            self.settings.topic(f"{topic}.dlq"),
            key=record.key,
            headers=dlq_headers(record, reason=reason, error=error, service=m.service),
        )
        m.dlq_messages.labels(m.service, topic, reason).inc()
        m.events_handled.labels(m.service, topic, ce_type, "dead_lettered").inc()

    # -- publishing (the outbox relay's side) ---------------------------------------------

    async def publish_outbox_message(self, message: OutboxMessage) -> Awaitable[object]:
        """Send one outbox row; returns the broker acknowledgement to await."""
        future = await self.broker.publish(
            message.payload,
            self.settings.topic(message.topic),
            key=message.key.encode() if message.key is not None else None,
            headers=message.headers,
            no_confirm=True,
        )
        return future  # type: ignore[no-any-return]

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect the producer only (e.g. a process that runs just the outbox relay)."""
        await self._configure_producer()
        await self.broker.connect()

    async def start(self) -> None:
        """Connect the broker, start the subscribers and the lag sampler."""
        self._draining = False
        await self._configure_producer()
        self._register_consumers()
        await self.broker.start()
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
        await self.committer.stop()

    async def stop(self) -> None:
        """Drain (if not yet done), then leave the groups and disconnect."""
        await self.drain()
        await self.broker.stop()

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
