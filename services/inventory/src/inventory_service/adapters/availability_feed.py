"""The availability feed behind ``GET /availability/stream``: a tail of
``inventory.availability.v1``, a bounded ring per SKU, and a bounded queue per client.

Why a tail of the topic, not a hook after the service's own commits: several inventory
instances run behind one load balancer, and a browser connected to instance B must see the
sale instance A committed. Every instance therefore reads *every* partition of the topic,
with no consumer group (manual assignment: no rebalances, no offsets to commit, nothing to
clean up when an instance goes away); the topic is keyed by SKU, so one SKU's changes are in
order in one partition, and the Kafka offset is a per-SKU sequence that every instance agrees
on. That is the SSE ``id``: a client that reconnects to another instance with
``Last-Event-ID`` resumes exactly where it stopped. It costs one broker hop (a few ms).

Fan-out is bounded: each client has a queue of ``queue_size`` events; a client whose queue
is full (it does not read fast enough) is dropped and counted, never waited for, so it never
slows the others or the consumer. A dropped browser reconnects by itself with its
``Last-Event-ID`` and gets what it missed from the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from faststream.kafka.security import parse_security
from omni_common.kafka import CONSUMER_IDLE_WAKE_MS, KafkaRuntime, broker_security
from omni_contracts import INVENTORY_AVAILABILITY
from omni_contracts.envelope import header_map
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

Position = dict[int, int]
"""Partition -> offset of the last event a client has (the SSE id, decoded)."""

# What the public stream shows of an availability change: what a shop page shows, not the
# stock room's figures (on_hand, reserved and safety stock stay behind the API key).
PUBLIC_FIELDS = (
    "sku",
    "location_id",
    "available",
    "status",
    "previous_status",
    "online_available",
    "cause",
    "changed_at",
)


class BadEventId(ValueError):
    """A ``Last-Event-ID`` this stream never sent."""


def encode_position(position: Mapping[int, int]) -> str:
    """The SSE id of a position: ``partition:offset`` pairs, comma-separated."""
    return ",".join(f"{p}:{o}" for p, o in sorted(position.items()))


def decode_position(text: str) -> Position:
    """The position an SSE id names; :class:`BadEventId` if it is not one of ours."""
    position: Position = {}
    if not text.strip():
        return position
    try:
        for pair in text.split(","):
            partition, offset = pair.split(":")
            position[int(partition)] = int(offset)
    except ValueError:
        raise BadEventId(f"Last-Event-ID {text[:80]!r} is not partition:offset,...") from None
    if len(position) > 10_000 or any(p < 0 or o < -1 for p, o in position.items()):
        raise BadEventId("Last-Event-ID out of range")
    return position


@dataclass(frozen=True, slots=True)
class Change:
    """One availability change as the stream tells it."""

    partition: int
    offset: int
    sku: str
    location_id: str
    data: str  # the public JSON, ready to send
    published_at_ms: int  # the broker timestamp, for the propagation histogram


@dataclass
class Filter:
    """Which changes a client asked for (empty: all)."""

    skus: frozenset[str] = frozenset()
    locations: frozenset[str] = frozenset()

    def matches(self, sku: str, location_id: str) -> bool:
        """Whether a change of ``sku`` at ``location_id`` is for this client."""
        return (not self.skus or sku in self.skus) and (
            not self.locations or location_id in self.locations
        )


@dataclass(eq=False)
class Client:
    """One connected stream: its filter, its queue and where it stands."""

    filter: Filter
    queue: asyncio.Queue[Change | None]
    dropped: bool = False


@dataclass
class _SkuRing:
    changes: deque[Change]
    # Offset of the newest change this ring no longer holds (-1: it never lost one).
    trimmed_upto: int = -1


class StreamMetrics:
    """Connected clients, dropped clients, events sent and topic-to-client latency."""

    def __init__(self, service: str, registry: Any) -> None:
        self.service = service
        self.clients = Gauge(
            "omni_inventory_stream_clients",
            "Clients connected to GET /availability/stream",
            ["service"],
            registry=registry,
        )
        self.dropped = Counter(
            "omni_inventory_stream_dropped_clients",
            "Stream clients dropped, by reason (slow: their queue was full; full: too many)",
            ["service", "reason"],
            registry=registry,
        )
        self.events = Counter(
            "omni_inventory_stream_events",
            "Availability changes queued to stream clients",
            ["service"],
            registry=registry,
        )
        self.feed_delay = Histogram(
            "omni_inventory_stream_feed_delay_seconds",
            "From an availability change reaching the broker to the stream feed reading it",
            ["service"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry,
        )
        self.clients.labels(service).set(0)


@dataclass
class AvailabilityFeed:
    """Recent availability changes per SKU and the clients waiting for the next ones."""

    metrics: StreamMetrics
    ring_size: int = 64
    max_skus: int = 100_000
    queue_size: int = 256
    max_clients: int = 10_000
    _rings: OrderedDict[str, _SkuRing] = field(default_factory=OrderedDict)
    # Per partition: the newest offset read, and the newest offset evicted with a whole SKU.
    _head: Position = field(default_factory=dict)
    _evicted: Position = field(default_factory=dict)
    _clients: set[Client] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    # -- the consumer's side ------------------------------------------------------------------

    def add(self, change: Change) -> None:
        """Keep ``change`` in its SKU's ring and queue it to every client that wants it."""
        ring = self._rings.get(change.sku)
        if ring is None:
            ring = self._rings[change.sku] = _SkuRing(deque(maxlen=self.ring_size))
            if len(self._rings) > self.max_skus:
                _, evicted = self._rings.popitem(last=False)
                if evicted.changes:
                    last = evicted.changes[-1]
                    self._evicted[last.partition] = max(
                        self._evicted.get(last.partition, -1), last.offset
                    )
        else:
            self._rings.move_to_end(change.sku)
        if len(ring.changes) == ring.changes.maxlen:
            ring.trimmed_upto = ring.changes[0].offset
        ring.changes.append(change)
        self._head[change.partition] = max(self._head.get(change.partition, -1), change.offset)
        for client in list(self._clients):
            if client.dropped or not client.filter.matches(change.sku, change.location_id):
                continue
            try:
                client.queue.put_nowait(change)
                self.metrics.events.labels(self.metrics.service).inc()
            except asyncio.QueueFull:
                self._drop(client, "slow")

    def _drop(self, client: Client, reason: str) -> None:
        client.dropped = True
        self.metrics.dropped.labels(self.metrics.service, reason).inc()
        # Wake the client's writer so it ends the response now; the queue is full, so make
        # room for the marker (the events are lost to it, not to the ring).
        with contextlib.suppress(asyncio.QueueEmpty):
            client.queue.get_nowait()
        client.queue.put_nowait(None)

    # -- the clients' side --------------------------------------------------------------------

    def starts_at(self, position: Mapping[int, int]) -> None:
        """Where the topic ends when the feed starts (offsets before it may be in the ring)."""
        for partition, offset in position.items():
            self._head[partition] = max(self._head.get(partition, -1), offset)

    def head(self) -> Position:
        """Where the feed stands: the newest offset read per partition."""
        return dict(self._head)

    def backlog(self, flt: Filter, since: Mapping[int, int]) -> tuple[list[Change], bool]:
        """The changes after ``since`` that ``flt`` wants, oldest first, and whether some
        may be missing (the ring no longer reaches back that far: reload the state)."""
        # A whole SKU evicted past ``since``: it may have been one of this client's.
        gap = any(since.get(p, -1) < o for p, o in self._evicted.items())
        rings: Iterable[tuple[str, _SkuRing]] = (
            ((sku, self._rings[sku]) for sku in flt.skus if sku in self._rings)
            if flt.skus
            else list(self._rings.items())
        )
        out: list[Change] = []
        for _, ring in rings:
            if not ring.changes:
                continue
            if ring.trimmed_upto >= 0 and since.get(ring.changes[0].partition, -1) < (
                ring.trimmed_upto
            ):
                gap = True
            out.extend(
                c
                for c in ring.changes
                if c.offset > since.get(c.partition, -1) and flt.matches(c.sku, c.location_id)
            )
        out.sort(key=lambda c: (c.partition, c.offset))
        return out, gap

    def open(self, flt: Filter) -> Client | None:
        """Register a client (None when the stream is full: answer 503)."""
        if len(self._clients) >= self.max_clients:
            self.metrics.dropped.labels(self.metrics.service, "full").inc()
            return None
        client = Client(flt, asyncio.Queue(self.queue_size))
        self._clients.add(client)
        self.metrics.clients.labels(self.metrics.service).set(len(self._clients))
        return client

    def close(self, client: Client) -> None:
        """Forget a client whose response ended."""
        self._clients.discard(client)
        self.metrics.clients.labels(self.metrics.service).set(len(self._clients))

    @property
    def client_count(self) -> int:
        """How many clients are connected."""
        return len(self._clients)


def to_change(record: Any) -> Change | None:
    """The stream's view of one record of ``inventory.availability.v1`` (None: not one)."""
    headers = header_map(record.headers or ())
    if headers.get("ce_type") != "inventory.availability.changed":
        return None
    try:
        body = json.loads(record.value)
        public = {k: body[k] for k in PUBLIC_FIELDS}
    except (ValueError, KeyError, TypeError):
        return None  # inventory's own DLQ rules do not apply: the stream only skips it
    # Lets a channel match a change to the event that caused it (a till to its own sale).
    public["causation_id"] = headers.get("causation_id")
    return Change(
        partition=record.partition,
        offset=record.offset,
        sku=str(public["sku"]),
        location_id=str(public["location_id"]),
        data=json.dumps(public, separators=(",", ":")),
        published_at_ms=record.timestamp,
    )


@contextlib.asynccontextmanager
async def tailing(
    feed: AvailabilityFeed, kafka: KafkaRuntime, warm: int = 1000
) -> AsyncIterator[None]:
    """Read every partition of the availability topic into ``feed`` while the service runs.

    Starts ``warm`` changes back per partition, so clients reconnecting after a restart
    still find recent history.
    """
    settings = kafka.settings
    topic = settings.topic(INVENTORY_AVAILABILITY)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.service_name}-stream",
        group_id=None,
        enable_auto_commit=False,
        # The service's consumers' wait (chosen for the broker when not configured).
        fetch_max_wait_ms=kafka.fetch_max_wait_ms(),
        consumer_timeout_ms=CONSUMER_IDLE_WAKE_MS,
        **parse_security(broker_security(settings)),
    )
    await consumer.start()
    task: asyncio.Task[None] | None = None
    try:
        partitions = await _partitions(consumer, topic)
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, max(starts[tp], ends[tp] - warm))
        # Every partition has a place in the ids from the start, even one with no change yet.
        feed.starts_at({tp.partition: ends[tp] - 1 for tp in partitions})
        task = asyncio.create_task(_run(consumer, feed, ends), name="availability-feed")
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    # The topic is created before the services start; a fresh broker may still be telling.
    for _ in range(100):
        # The client's own metadata only covers subscribed topics, and this consumer assigns
        # instead of subscribing: ask the cluster directly.
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions")


async def _run(
    consumer: AIOKafkaConsumer, feed: AvailabilityFeed, ends: Mapping[TopicPartition, int]
) -> None:
    caught_up = {tp for tp, end in ends.items() if end == 0 or end <= await consumer.position(tp)}
    if len(caught_up) == len(ends):
        feed.ready.set()
    m = feed.metrics
    while True:
        try:
            batches = await consumer.getmany(timeout_ms=CONSUMER_IDLE_WAKE_MS, max_records=1000)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("availability feed: fetch failed; retrying", exc_info=True)
            await asyncio.sleep(1)
            continue
        now_ms = time.time() * 1000
        for tp, records in batches.items():
            for record in records:
                change = to_change(record)
                if change is not None:
                    feed.add(change)
                    if feed.ready.is_set():
                        m.feed_delay.labels(m.service).observe(
                            max(now_ms - record.timestamp, 0) / 1000
                        )
            if records and records[-1].offset + 1 >= ends.get(tp, 0):
                caught_up.add(tp)
        if not feed.ready.is_set() and len(caught_up) == len(ends):
            feed.ready.set()
