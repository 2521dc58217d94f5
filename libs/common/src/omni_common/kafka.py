"""Kafka through FastStream: the broker connection, the one producer, the fetch loop.

FastStream (0.7) owns the connections: the producer every event leaves through (the outbox
relay and the DLQ alike) and the service's consumer, with its group, its rebalance listener
and its security options. The runtime reads that consumer itself. FastStream's consume
loop hands a batch over only after a chain of awaits, and sleeps after an empty poll
(``BatchSubscriber.get_msg`` in 0.7.8 has no way to wait for records without it); the
partition workers need every fetched record handed over with no await in between, so that
a worker that seeks back never receives a record fetched before the seek. So each
subscriber is declared without a handler (FastStream then starts its consumer and leaves
the reading to us) and the runtime's fetch loop calls the consumer's ``getmany``.

Offsets are committed only after the effect is durable (:mod:`omni_common.offsets`);
records are handled per partition, in order (:mod:`omni_common.worker`), and validated,
handled or dead-lettered by :mod:`omni_common.dispatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Mapping
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ConsumerStoppedError, IllegalStateError, KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.security import parse_security
from faststream.security import BaseSecurity, SASLScram256, SASLScram512
from omni_contracts.catalogue import EVENT_TYPES
from opentelemetry import propagate, trace

from omni_common.dispatch import Dispatcher, Route
from omni_common.metrics import PlatformMetrics
from omni_common.offsets import OffsetCommitter
from omni_common.outbox import OutboxMessage
from omni_common.producer import ProducerOptions, producer_options
from omni_common.settings import ServiceSettings
from omni_common.telemetry import spans_wanted
from omni_common.worker import PartitionWorker

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("omni_common.kafka")

# Fetch waits per broker (see ``KafkaRuntime.fetch_max_wait_ms``). Kafka's own client waits
# 500 ms, but it keeps fetch sessions (an empty answer names no partition); aiokafka sends
# and parses every partition each time, so it waits longer.
# The wait delays only partitions that join an in-flight fetch late (resumed, reassigned).
KAFKA_FETCH_MAX_WAIT_MS = 1000
TANSU_FETCH_MAX_WAIT_MS = 5
# How often an idle fetch loop wakes (aiokafka's default, 200 ms, is an idle consumer's
# main cost). Records, fetch answers, resumed partitions and rebalances wake it anyway.
CONSUMER_IDLE_WAKE_MS = 5000


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


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Drops revoked partitions' workers and commits what they handled before letting go.

    aiokafka awaits ``on_partitions_revoked`` before the group rebalances, while this member
    still owns the partitions, so the commit lands and the new owner starts right after the
    last handled record (the inbox absorbs anything handled but not yet committed).
    """

    def __init__(self, runtime: KafkaRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop the revoked partitions' workers, then commit their handled offsets."""
        if revoked:
            await self.runtime.drop_partitions(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Nothing to do: workers start with the first record of a partition."""


class KafkaRuntime:
    """A service's broker connection, its consumer and producer, and its partition workers."""

    def __init__(self, settings: ServiceSettings, metrics: PlatformMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.security = broker_security(settings)
        # Contract topic names (unprefixed), for the ACLs and the AsyncAPI document.
        self.consumes: set[str] = set()
        self.produces: set[str] = set()
        self.reads: set[str] = set()
        self._routes: dict[str, Route] = {}  # physical topic -> route
        self.committer = OffsetCommitter(settings.consumer_commit_interval_ms / 1000)
        self.producer_options: ProducerOptions | None = None
        self._broker: KafkaBroker | None = None
        self._subscriber: Any = None
        self._dispatcher: Dispatcher | None = None
        self._workers: dict[TopicPartition, PartitionWorker] = {}
        # The workers of one topic's partitions, which lend each other their waiting events.
        self._neighbours: dict[str, list[PartitionWorker]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False

    # -- wiring ---------------------------------------------------------------------------

    def add_route(self, route: Route) -> None:
        """Consume ``route.topic`` in this service's consumer group."""
        physical = self.settings.topic(route.topic)
        if physical in self._routes:
            raise ValueError(f"{route.topic} is already subscribed")
        self._routes[physical] = route
        self.consumes.add(route.topic)
        self.produces.add(f"{route.topic}.dlq")

    def declare_output(self, topic: str) -> None:
        """Declare that this service publishes to ``topic`` (through its outbox)."""
        self.produces.add(topic)

    def declare_read(self, topic: str) -> None:
        """Declare that this service reads ``topic`` outside its consumer group (a feed)."""
        self.reads.add(topic)

    def handled_event_types(self) -> dict[str, frozenset[str]]:
        """Contract topic -> the ``ce_type`` values this service handles there."""
        return {r.topic: frozenset(r.handlings) for r in self._routes.values()}

    @staticmethod
    def contract_types(topic: str) -> frozenset[str]:
        """The event types the contract puts on ``topic``."""
        return frozenset(t for t, model in EVENT_TYPES.items() if model.topic == topic)

    @property
    def broker(self) -> KafkaBroker:
        """The FastStream broker (once connected)."""
        if self._broker is None:
            raise RuntimeError("the Kafka runtime is not connected")
        return self._broker

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

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect the producer (the broker's options settled first): enough for a process
        that only publishes, such as an outbox relay."""
        if self._broker is not None:
            return
        s = self.settings
        # The producer's durability depends on what this broker supports, so it is asked
        # first and the broker built with the answer.
        options = await producer_options(s.kafka_bootstrap_servers, **parse_security(self.security))
        self.producer_options = options
        self._broker = KafkaBroker(
            s.kafka_bootstrap_servers,
            client_id=s.service_name,
            security=self.security,
            **options.as_kwargs(),
            # Topics are created by `omni topics create` (or Strimzi), with their sizes and
            # retention; a service creating one by subscribing would get neither.
            allow_auto_create_topics=False,
            # No middlewares: the partition workers count and time the handling, and the
            # dispatcher makes each record's consumer span.
            logger=logging.getLogger(f"faststream.{s.service_name}"),
        )
        await self._broker.connect()

    async def start(self, dispatcher: Dispatcher) -> None:
        """Connect, join the group and start fetching for ``dispatcher``."""
        self._draining = False
        self._dispatcher = dispatcher
        await self.connect()
        s = self.settings
        if self._routes and self._subscriber is None:
            # No handler: FastStream starts the consumer and leaves the reading to us.
            self._subscriber = self.broker.subscriber(
                *self._routes,
                group_id=s.group_id(),
                listener=RebalanceListener(self),
                ack_policy=AckPolicy.MANUAL,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.fetch_max_wait_ms(),
                consumer_timeout_ms=CONSUMER_IDLE_WAKE_MS,
                session_timeout_ms=s.consumer_session_timeout_ms,
                heartbeat_interval_ms=s.consumer_heartbeat_interval_ms,
                title=s.service_name,
            )
        await self.broker.start()
        self.committer.start()
        if self._subscriber is not None:
            self._tasks = [
                asyncio.create_task(self._fetch(self._subscriber.consumer), name="kafka-fetch"),
                asyncio.create_task(self._sample_lag(), name="consumer-lag"),
            ]

    async def drain(self, grace_s: float = 10.0) -> None:
        """Stop fetching, finish the records in hand, commit: the first half of a shutdown.

        The broker stays connected, so the outbox relay can still publish; :meth:`stop`
        then leaves the group.
        """
        if self._draining:
            return
        self._draining = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        consumer = self._consumer()
        if consumer is not None:
            with contextlib.suppress(Exception):  # not yet joined: nothing assigned
                consumer.pause(*consumer.assignment())
        # Workers finish what they hold (a bounded wait); their offsets are committed while
        # the consumer is still a member; queued records come again to the next owner.
        await asyncio.gather(*(w.stop(grace_s=grace_s) for w in self._workers.values()))
        self._workers.clear()
        self._neighbours.clear()
        await self.committer.stop()

    async def stop(self) -> None:
        """Drain (if not yet done), then leave the group and disconnect."""
        await self.drain()
        if self._broker is not None:
            broker, self._broker, self._subscriber = self._broker, None, None
            await broker.stop()

    def _consumer(self) -> Any:
        return getattr(self._subscriber, "consumer", None)

    # -- consuming ------------------------------------------------------------------------

    async def _fetch(self, consumer: Any) -> None:
        """Hand every fetched record to its partition's worker, with no await in between."""
        linger_s = self.settings.consumer_linger_ms / 1000
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=CONSUMER_IDLE_WAKE_MS)
            except ConsumerStoppedError:
                return
            except KafkaError:
                log.warning("fetch failed; retrying", exc_info=True)
                await asyncio.sleep(1)
                continue
            if not fetched:
                continue
            for tp, records in fetched.items():
                worker = self._worker(consumer, tp)
                for record in records:
                    # Never waits: a busy partition is paused alone, the others keep flowing.
                    worker.offer(record)
            if linger_s:
                await self._linger(consumer, linger_s)

    def _worker(self, consumer: Any, tp: TopicPartition) -> PartitionWorker:
        worker = self._workers.get(tp)
        if worker is None:
            assert self._dispatcher is not None
            s = self.settings
            worker = self._workers[tp] = PartitionWorker(
                self._dispatcher,
                self.committer,
                consumer,
                tp,
                self._routes[tp.topic],
                queue_size=s.consumer_queue_size,
                lot_size=s.consumer_batch_max,
                neighbours=self._neighbours.setdefault(tp.topic, []),
            )
        return worker

    async def _linger(self, consumer: Any, seconds: float) -> None:
        """Fetch nothing for ``seconds``: what arrives meanwhile comes in one fetch, to be
        handled as one lot. Only after records came, so a quiet consumer never waits."""
        held = consumer.assignment() - consumer.paused()
        with contextlib.suppress(IllegalStateError):  # a rebalance took some meanwhile
            consumer.pause(*held)
        await asyncio.sleep(seconds)
        for tp in held:
            worker = self._workers.get(tp)
            if worker is not None and worker.paused:
                continue  # its worker resumes it once its queue has drained
            with contextlib.suppress(IllegalStateError):
                consumer.resume(tp)

    async def drop_partitions(self, revoked: set[TopicPartition]) -> None:
        """Stop the workers of ``revoked`` partitions and commit what they handled."""
        workers = [self._workers.pop(tp) for tp in revoked if tp in self._workers]
        # Bounded: the rebalance waits for this, and the group for the rebalance.
        grace_s = self.settings.consumer_revoke_grace_s
        await asyncio.gather(*(w.stop(grace_s=grace_s) for w in workers))
        consumer = self._consumer()
        if consumer is not None:
            await self.committer.flush(consumer, revoked)
        if workers:
            log.info("dropped %d revoked partition worker(s)", len(workers))

    async def _sample_lag(self, every_s: float = 10.0) -> None:
        m = self.metrics
        group = self.settings.group_id()
        while True:
            await asyncio.sleep(every_s)
            consumer = self._consumer()
            if consumer is None:
                continue
            try:
                for tp in consumer.assignment():
                    highwater = consumer.highwater(tp)
                    if highwater is None:
                        continue
                    position = await consumer.position(tp)
                    m.consumer_lag.labels(m.service, group, tp.topic, str(tp.partition)).set(
                        max(highwater - position, 0)
                    )
            except Exception:  # a rebalance in progress; next round
                log.debug("lag sampling skipped", exc_info=True)

    # -- publishing -----------------------------------------------------------------------

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Mapping[str, str]
    ) -> Awaitable[object]:
        """Hand one record to the producer; returns the broker acknowledgement to await."""
        future: Awaitable[object] = await self.broker.publish(
            value,
            topic,
            key=key,
            headers=dict(headers),
            correlation_id=headers.get("correlation_id"),
            no_confirm=True,
        )
        return future

    async def publish_outbox_message(self, message: OutboxMessage) -> Awaitable[object]:
        """Send one outbox row; returns the broker acknowledgement to await.

        The row already carries its CloudEvents headers and the trace context it was written
        in; the producer span is its child, and the consumer's span continues from it.
        """
        destination = self.settings.topic(message.topic)
        key = message.key.encode() if message.key is not None else None
        if not spans_wanted():  # the row's trace headers go on as they are
            return await self.send(destination, message.payload, key, message.headers)
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
            return await self.send(destination, message.payload, key, headers)
        finally:
            span.end()
