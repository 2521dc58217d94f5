"""Kafka through FastStream, with the delivery rules every service follows.

For each subscription:

- offsets are committed only after the handler's effect is durable (``NACK_ON_ERROR``: the
  message is acknowledged after the handler returns, and a failure that could not even be
  dead-lettered rewinds the partition so nothing is lost);
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
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from faststream.security import BaseSecurity, SASLScram256, SASLScram512

from omni_common.contracts.base import Event
from omni_common.contracts.catalogue import EVENT_TYPES
from omni_common.envelope import Envelope, EnvelopeError, PayloadError, decode, parse_envelope
from omni_common.metrics import PlatformMetrics
from omni_common.outbox import OutboxMessage
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


class KafkaRuntime:
    """A service's FastStream broker with its subscriptions, DLQ publishing and metrics."""

    def __init__(self, settings: ServiceSettings, metrics: PlatformMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.broker = KafkaBroker(
            settings.kafka_bootstrap_servers,
            client_id=settings.service_name,
            security=broker_security(settings),
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
                ack_policy=AckPolicy.NACK_ON_ERROR,
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
            topic, consumer_name, handlers = by_physical[record.topic]
            await self._consume(record, topic, consumer_name, handlers)

        return consume

    def declare_output(self, topic: str) -> None:
        """Declare that this service publishes to ``topic`` (through its outbox)."""
        self.produces.add(topic)

    # -- consuming ------------------------------------------------------------------------

    async def _consume(
        self,
        record: ConsumerRecord[Any, Any],
        topic: str,
        consumer_name: str,
        handlers: Mapping[str, tuple[type[Event], EventHandler]],
    ) -> None:
        m = self.metrics
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

    async def start(self) -> None:
        """Connect the broker, start the subscribers and the lag sampler."""
        self._register_consumers()
        await self.broker.start()
        self._lag_task = asyncio.create_task(self._sample_lag(), name="consumer-lag")

    async def stop(self) -> None:
        """Finish in-flight messages and disconnect."""
        if self._lag_task:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        await self.broker.stop()

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
