"""The transactional outbox: write events with the state change, publish them afterwards.

``add_to_outbox`` inserts the event in the caller's transaction; a trigger notifies the relay
(``pg_notify`` is delivered on commit, so the relay never sees uncommitted rows).

``OutboxRelay`` publishes unpublished rows in id order. Only one relay per service schema
is active at a time (a PostgreSQL advisory lock elects it), which keeps per-key order even
with several instances running; the others stand by and take over when it dies. A crash
between the publish and the ``published_at`` update republishes the batch: consumers dedup
by ``ce_id`` (at-least-once, never lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from omni_contracts.base import Event
from omni_contracts.envelope import Envelope, encode

from omni_common.metrics import PlatformMetrics
from omni_common.telemetry import attach_trace_headers, current_trace_headers, detach

log = logging.getLogger(__name__)


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel on which a schema's outbox announces new rows."""
    return f"outbox_{schema}"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One row of the outbox, ready to publish."""

    id: int
    topic: str
    key: str | None
    headers: dict[str, str]
    payload: bytes | None  # None: a tombstone (a keyed null value)


async def add_to_outbox(
    conn: asyncpg.Connection,
    *,
    topic: str,
    event: Event,
    envelope: Envelope,
) -> None:
    """Queue ``event`` for publication to ``topic`` within the caller's transaction.

    The current trace context is stored with the row so the publish joins the same trace.
    """
    headers = envelope.headers() | current_trace_headers()
    await conn.execute(
        "INSERT INTO outbox (ce_id, ce_type, topic, key, headers, payload)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        envelope.id,
        envelope.type,
        topic,
        event.partition_key(),
        json.dumps(headers),
        encode(event),
    )


async def add_all_to_outbox(
    conn: asyncpg.Connection, items: Sequence[tuple[str, Event, Envelope]]
) -> None:
    """Queue many ``(topic, event, envelope)`` in the caller's transaction, pipelined in one
    round trip (for handlers that emit a batch, e.g. timers decided together)."""
    trace = current_trace_headers()
    await conn.executemany(
        "INSERT INTO outbox (ce_id, ce_type, topic, key, headers, payload)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        [
            (
                envelope.id,
                envelope.type,
                topic,
                event.partition_key(),
                json.dumps(envelope.headers() | trace),
                encode(event),
            )
            for topic, event, envelope in items
        ],
    )


async def add_tombstone_to_outbox(
    conn: asyncpg.Connection, *, topic: str, key: str, ce_id: str
) -> None:
    """Queue a tombstone (a null value for ``key``) on a compacted ``topic``.

    Compaction then drops every earlier record of the key. The row carries no CloudEvents
    headers (a tombstone is no event); consumers skip null values.
    """
    await conn.execute(
        "INSERT INTO outbox (ce_id, ce_type, topic, key, headers, payload)"
        " VALUES ($1, 'tombstone', $2, $3, $4::jsonb, NULL)",
        ce_id,
        topic,
        key,
        json.dumps(current_trace_headers()),
    )


# publish(message) -> an awaitable that completes once the broker acknowledged the write.
# Sending all of a batch before awaiting keeps per-partition order (one in-flight batch per
# partition in aiokafka) while overlapping the round trips.
Publisher = Callable[[OutboxMessage], Awaitable[Awaitable[object]]]


class OutboxRelay:
    """Publishes a service's outbox to Kafka; run one per service instance."""

    def __init__(
        self,
        *,
        dsn: str,
        schema: str,
        publish: Publisher,
        metrics: PlatformMetrics,
        batch_size: int = 500,
        poll_interval_s: float = 1.0,
        retention: timedelta = timedelta(days=1),
        inbox_retention: timedelta = timedelta(days=8),
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._publish = publish
        self._metrics = metrics
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._retention = retention
        # A redelivery can only come from what the topics still hold (7 days by default):
        # inbox rows older than that guard nothing.
        self._inbox_retention = inbox_retention
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start relaying in the background."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self._schema}")

    async def stop(self) -> None:
        """Stop after the batch in flight (unpublished rows stay for the next relay)."""
        self._stopping = True
        self._wakeup.set()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn)
        await conn.execute(f'SET search_path TO "{self._schema}", public')
        return conn

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                await self._lead(conn)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "outbox relay for %s failed; retrying in %.1fs", self._schema, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))

    async def _lead(self, conn: asyncpg.Connection) -> None:
        # Session-level advisory lock: released by PostgreSQL when this connection dies.
        # Standbys poll for it: there is no notification when another session lets go.
        while not await conn.fetchval(  # noqa: ASYNC110
            "SELECT pg_try_advisory_lock(hashtext($1))", f"outbox:{self._schema}"
        ):
            await asyncio.sleep(self._poll_interval_s)
        await conn.add_listener(notify_channel(self._schema), self._on_notify)
        log.info("outbox relay for %s is active", self._schema)
        last_purge = last_observed = 0.0
        while not self._stopping:
            self._wakeup.clear()
            # A full batch means there may be more now; a partial one drained the outbox
            # (anything committed meanwhile has notified and set the wake-up again).
            published = await self.relay_once(conn)
            now = time.monotonic()
            if now - last_observed >= 1.0:  # also under load, when the backlog matters
                await self._observe_backlog(conn)
                last_observed = now
            if published == self._batch_size:
                continue
            if now - last_purge > 60:
                await conn.execute(
                    "DELETE FROM outbox WHERE published_at < now() - $1::interval",
                    self._retention,
                )
                await conn.execute(
                    "DELETE FROM inbox WHERE received_at < now() - $1::interval",
                    self._inbox_retention,
                )
                last_purge = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._poll_interval_s)

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def relay_once(self, conn: asyncpg.Connection) -> int:
        """Publish one batch of unpublished rows in id order; returns how many."""
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT id, topic, key, headers, payload FROM outbox"
                " WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch_size,
            )
            if not rows:
                return 0
            messages = [
                OutboxMessage(r["id"], r["topic"], r["key"], json.loads(r["headers"]), r["payload"])
                for r in rows
            ]
            try:
                await self._publish_all(messages)
            except Exception as exc:
                # Leave the rows unpublished (the transaction rolls back) and note why.
                raise OutboxPublishError(str(exc)) from exc
            await conn.execute(
                "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1::bigint[])",
                [m.id for m in messages],
            )
        for m in messages:
            self._metrics.outbox_published.labels(self._metrics.service, m.topic).inc()
        return len(messages)

    async def _publish_all(self, messages: Sequence[OutboxMessage]) -> None:
        pending: list[Awaitable[object]] = []
        for message in messages:
            token = attach_trace_headers(message.headers)
            try:
                pending.append(await self._publish(message))
            finally:
                detach(token)
        await asyncio.gather(*pending)

    async def _observe_backlog(self, conn: asyncpg.Connection) -> None:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM now() - min(created_at)) AS age"
            " FROM outbox WHERE published_at IS NULL"
        )
        service = self._metrics.service
        self._metrics.outbox_backlog.labels(service).set(row["n"] if row else 0)
        self._metrics.outbox_oldest_age.labels(service).set(float(row["age"] or 0) if row else 0)


class OutboxPublishError(RuntimeError):
    """The broker did not take a batch; its rows stay in the outbox and are retried."""
