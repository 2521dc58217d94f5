"""Kafka through FastStream, with the delivery rules every service follows.

For each subscription:

- offsets are committed only after the handler's effect is durable (manual acknowledgement:
  handled offsets are committed in the background every ``consumer_commit_interval_ms``,
  and a failure that could not even be dead-lettered rewinds the partition, so nothing is
  skipped and nothing is lost);
- the CloudEvents envelope and the payload are validated here, so a handler only ever sees a
  valid event; what fails goes to ``<topic>.dlq`` with the reason in headers;
- transient failures are retried with exponential backoff a bounded number of times, then
  dead-lettered; a :class:`RejectedEvent` (illegal in the domain) is dead-lettered at once.

Messages of one partition are handled one after the other, which keeps per-key order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
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

from omni_common.metrics import PlatformMetrics
from omni_common.outbox import OutboxMessage
from omni_common.producer import PRODUCER_MAX_REQUEST_SIZE, ProducerOptions, producer_options
from omni_common.settings import ServiceSettings

log = logging.getLogger(__name__)

EventHandler = Callable[[Any, Envelope], Awaitable[None]]
"""A handler: ``async def handle(event, envelope) -> None``."""


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

    async def flush(self) -> None:
        """Commit everything handled so far."""
        pending, self._pending = self._pending, {}
        for consumer, offsets in pending.items():
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
    up the other partitions. If a message cannot even be dead-lettered, the worker drops
    what it has queued and rewinds the partition to that message, so nothing is skipped.
    """

    def __init__(
        self,
        runtime: KafkaRuntime,
        consumer: Any,
        by_physical: Mapping[str, tuple[str, str, Mapping[str, Any]]],
        queue_size: int,
    ) -> None:
        self.runtime = runtime
        self.consumer = consumer
        self.by_physical = by_physical
        self.queue: asyncio.Queue[KafkaMessage] = asyncio.Queue(queue_size)
        self.resume_at: int | None = None
        self.busy = False
        self.stopping = False
        self.task = asyncio.create_task(self._run(), name="partition-worker")

    async def _run(self) -> None:
        while not self.stopping:
            self.busy = False
            message = await self.queue.get()
            self.busy = True
            record = message.raw_message
            assert isinstance(record, ConsumerRecord)
            if self.resume_at is not None:
                if record.offset != self.resume_at:
                    continue  # fetched before the rewind: it comes again
                self.resume_at = None
            topic, consumer_name, handlers = self.by_physical[record.topic]
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
            self.runtime.committer.handled(self.consumer, record)

    def _rewind(self, record: ConsumerRecord[Any, Any]) -> None:
        # No await between dropping the queue and the seek: nothing slips in between.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.resume_at = record.offset
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile: the new owner has it
            self.consumer.seek(TopicPartition(record.topic, record.partition), record.offset)

    async def stop(self, grace_s: float) -> None:
        """Finish the message in hand (up to ``grace_s``); what is queued comes again."""
        self.stopping = True
        if self.busy:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), grace_s)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


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
            self.broker.subscriber(
                *by_physical,
                group_id=s.group_id(purpose),
                ack_policy=AckPolicy.MANUAL,
                decoder=_raw_body,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=s.consumer_fetch_max_wait_ms,
                session_timeout_ms=s.consumer_session_timeout_ms,
                heartbeat_interval_ms=s.consumer_heartbeat_interval_ms,
                title=f"{s.service_name}:{purpose}",
                description=consume.__doc__,
            )(consume)

    def _dispatcher(
        self, by_physical: Mapping[str, tuple[str, str, Mapping[str, Any]]]
    ) -> Callable[[KafkaMessage], Awaitable[None]]:
        # A closure, not a default argument: FastStream would take one for a body field.
        async def consume(message: KafkaMessage) -> None:
            record = message.raw_message
            assert isinstance(record, ConsumerRecord)
            key = (id(message.consumer), record.topic, record.partition)
            worker = self._workers.get(key)
            if worker is None:
                worker = self._workers[key] = PartitionWorker(
                    self, message.consumer, by_physical, self.settings.consumer_queue_size
                )
            # Bounded: a busy partition holds up fetching (backpressure), never memory.
            await worker.queue.put(message)

        return consume

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
        s, m = self.settings, self.metrics
        delay = s.handler_backoff_initial_s
        for attempt in range(1, s.handler_max_attempts + 1):
            try:
                await handler(event, envelope)
            except RejectedEvent as exc:
                log.warning("rejected %s %s: %s", envelope.type, envelope.id, exc)
                await self._dead_letter(record, topic, exc.reason, str(exc), envelope.type)
                return
            except Exception as exc:
                if attempt == s.handler_max_attempts:
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
                m.handler_retries.labels(m.service, topic).inc()
                log.warning(
                    "retrying %s %s (attempt %d): %r", envelope.type, envelope.id, attempt, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.handler_backoff_max_s)
            else:
                m.events_handled.labels(m.service, topic, envelope.type, "handled").inc()
                return

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
        await self._configure_producer()
        self._register_consumers()
        await self.broker.start()
        self.committer.start()
        self._lag_task = asyncio.create_task(self._sample_lag(), name="consumer-lag")

    async def stop(self) -> None:
        """Finish in-flight messages and disconnect."""
        if self._lag_task:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        # Workers finish what they fetched (a bounded wait), their offsets are committed
        # while the consumers are still members, then the consumers leave.
        await asyncio.gather(*(w.stop(grace_s=10) for w in self._workers.values()))
        self._workers.clear()
        await self.committer.stop()
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
