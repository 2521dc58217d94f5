"""The transactional outbox: write events with the state change, publish them afterwards.

``Tx.emit`` (``omni_common.service``) inserts the event's row in the caller's transaction.
Once it commits, the writer wakes the relay: in-process when this instance's relay leads
(``OutboxRelay.wake``), else with a ``pg_notify`` sent in the transaction (delivered on
commit, so the relay never sees uncommitted rows). NOTIFY takes a cluster-wide lock at
commit, which is why it is not on every commit; the relay also polls, which bounds the
delay of any writer it did not hear.

``OutboxRelay`` publishes unpublished rows in id order. Only one relay per service schema
is active at a time (a PostgreSQL advisory lock elects it), which keeps per-key order even
with several instances running; the others stand by and take over when it dies. The
leader's session dies with it within seconds (TCP keepalives, ``idle_session_timeout``), so
a frozen or unplugged leader never holds the lock for long. Published rows are deleted; a
crash between the publish and the delete republishes the batch: consumers dedup by
``ce_id`` (at-least-once, never lost).

A row the broker will never take (larger than the topic accepts, invalid) is parked with
its error (``parked_at``, ``last_error``) instead of wedging the outbox: the rest of the
batch is published, ``omni_outbox_parked`` counts parked rows for the alert, and an operator
requeues the row once the cause is mended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from aiokafka.errors import (
    InvalidMessageError,
    InvalidTimestampError,
    InvalidTopicError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from omni_contracts.base import Event
from omni_contracts.envelope import Envelope, encode

from omni_common.db import advisory_key_sql, quote_ident, session_settings
from omni_common.metrics import PlatformMetrics
from omni_common.telemetry import attach_trace_headers, current_trace_headers, detach

log = logging.getLogger(__name__)


# What the broker will refuse however often it is asked: park the row, not the outbox.
_UNPUBLISHABLE = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidMessageError,
    InvalidTopicError,
    InvalidTimestampError,
    TypeError,  # a header or key the client cannot encode
    ValueError,
    UnicodeError,
)


def is_unpublishable(exc: BaseException) -> bool:
    """True when retrying ``exc`` cannot help (the row itself is the problem)."""
    return isinstance(exc, _UNPUBLISHABLE)


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


_INSERT = (
    "INSERT INTO outbox (ce_id, ce_type, topic, key, headers, payload)"
    " VALUES ($1, $2, $3, $4, $5::jsonb, $6)"
)

OutboxRow = tuple[str, str, str, str | None, str, bytes | None]
"""An outbox row to insert: ``(ce_id, ce_type, topic, key, headers JSON, payload)``."""


def outbox_row(
    topic: str, event: Event, envelope: Envelope, trace_headers: Mapping[str, str] | None = None
) -> OutboxRow:
    """The row for ``event``, carrying the trace it was caused in (by default the current
    one) so the publish joins it."""
    trace = current_trace_headers() if trace_headers is None else trace_headers
    headers = envelope.headers() | dict(trace)
    return (
        envelope.id,
        envelope.type,
        topic,
        event.partition_key(),
        json.dumps(headers),
        encode(event),
    )


def tombstone_row(topic: str, key: str, ce_id: str) -> OutboxRow:
    """The row of a tombstone (a null value for ``key``) on a compacted ``topic``.

    Compaction then drops every earlier record of the key. The row carries no CloudEvents
    headers (a tombstone is no event); consumers skip null values.
    """
    return (ce_id, "tombstone", topic, key, json.dumps(current_trace_headers()), None)


async def insert_outbox_rows(conn: asyncpg.Connection, rows: Sequence[OutboxRow]) -> None:
    """Insert rows in the caller's transaction, in order, pipelined in one round trip."""
    if len(rows) == 1:
        await conn.execute(_INSERT, *rows[0])
    elif rows:
        await conn.executemany(_INSERT, rows)


# publish(message) -> an awaitable that completes once the broker acknowledged the write.
# Sending all of a batch before awaiting keeps per-partition order (one in-flight batch per
# partition in aiokafka) while overlapping the round trips.
Publisher = Callable[[OutboxMessage], Awaitable[Awaitable[object]]]


# A relay with nothing more to publish deletes what it published this long after (a busy
# one deletes it with its next round's read, in the same statement).
FORGET_PUBLISHED_AFTER_S = 0.1


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
        server_settings: dict[str, str] | None = None,
        stop_grace_s: float = 5.0,
        publish_timeout_s: float = 7.0,
        purge_batch_size: int = 1000,
        linger_s: float = 0.0,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._publish = publish
        self._metrics = metrics
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        # After a round that published, rows committed meanwhile wait this long to go
        # together in the next: fewer rounds and produce requests where no shopper waits.
        self._linger_s = linger_s
        self._retention = retention
        # A redelivery can only come from what the topics still hold (7 days by default):
        # inbox rows older than that guard nothing.
        self._inbox_retention = inbox_retention
        # (table, timestamp column, retention) of a service's own dedup records.
        self._retained: list[tuple[str, str, timedelta]] = []
        # Expired rows go this many per statement: one DELETE of a long backlog held its
        # locks, and the leader's session busy, past the lease a standby evicts it after.
        self.purge_batch_size = purge_batch_size
        self._purge_due = False
        # The leader's session must end soon after the leader does, releasing the lock:
        # a frozen process (no statement for a while), a dead host (keepalives).
        # A leader runs a statement at least every poll interval; one frozen between two (or
        # in the middle of a batch, whose broker wait is bounded by publish_timeout_s) loses
        # its session, and so the lock, a few seconds later.
        idle_ms = int(max(5.0, 5 * poll_interval_s, publish_timeout_s + 3) * 1000)
        self._publish_timeout_s = publish_timeout_s
        in_tx_ms = int((publish_timeout_s + 3) * 1000)
        self._server_settings = {
            "idle_session_timeout": str(idle_ms),
            **session_settings(
                statement_timeout_ms=30_000, idle_in_transaction_timeout_ms=in_tx_ms
            ),
            **(server_settings or {}),
        }
        self._stop_grace_s = stop_grace_s
        self._lease_s = max(3 * poll_interval_s, publish_timeout_s + 5)
        self._wakeup = asyncio.Event()
        # Ids published and not yet deleted: deleted by the next round's read, in its one
        # statement (a crash before republishes them; consumers dedup).
        self._published: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.leading = False

    def retain(self, table: str, column: str, retention: timedelta) -> None:
        """Purge rows of ``table`` older than ``retention`` (by ``column``) with the outbox's.

        For a service's own dedup records (business keys), which guard nothing once every
        resend they could catch is older. Names come from code, never from input.
        """
        self._retained.append((table, column, retention))

    def wake(self) -> None:
        """Rows were committed in this process: relay them now rather than at the next poll.

        A standby ignores it (it waits for the leadership, not for rows).
        """
        if self.leading:
            self._wakeup.set()

    async def start(self) -> None:
        """Start relaying in the background."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self._schema}")

    async def stop(self) -> None:
        """Stop after the batch in flight (unpublished rows stay for the next relay)."""
        self._stopping = True
        self._wakeup.set()
        if self._task:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), self._stop_grace_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn, timeout=10, server_settings=self._server_settings)
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
                self.leading = False
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))

    async def _lead(self, conn: asyncpg.Connection) -> None:
        # Session-level advisory lock: released by PostgreSQL when this connection dies.
        # Standbys poll for it: there is no notification when another session lets go.
        lock = f"omni.outbox-relay:{self._schema}"
        while not await conn.fetchval(
            f"SELECT pg_try_advisory_lock({advisory_key_sql('$1')})", lock
        ):
            if self._stopping:
                return
            await self._evict_stale_leader(conn, lock)
            # Woken by stop(): a standby must not hold its service's shutdown for the grace.
            self._wakeup.clear()
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._poll_interval_s)
        # Writers in this process wake the relay directly (``wake``); other instances NOTIFY.
        await conn.add_listener(notify_channel(self._schema), self._on_notify)
        self.leading = True
        log.info("outbox relay for %s is active", self._schema)
        last_purge = last_observed = 0.0
        woken = True
        while not self._stopping:
            self._wakeup.clear()
            pending = True
            if not woken and not self._published:
                # A poll nobody woke: one statement tells whether rows of writers not heard
                # from wait, before a transaction looks for them.
                pending = await self._observe_backlog(conn) > 0
                last_observed = time.monotonic()
            # A full batch means there may be more now; a partial one drained the outbox
            # (anything committed meanwhile has notified and set the wake-up again).
            published = await self.relay_once(conn) if pending else 0
            now = time.monotonic()
            if now - last_observed >= 1.0:  # also under load, when the backlog matters
                await self._observe_backlog(conn)
                last_observed = now
            if published == self._batch_size:
                continue
            if now - last_purge > 60:
                self._purge_due = True
                last_purge = now
            if self._purge_due:
                self._purge_due = not await self.purge(conn)
                if self._purge_due:
                    # Interrupted by rows to relay (or the stop): relay them, then purge on.
                    woken = True
                    continue
            if published and self._linger_s and not self._stopping:
                await asyncio.sleep(self._linger_s)
            woken = False
            if self._published:
                # What was published goes with the next round's read; when none comes
                # soon, now: an erasure must find no published copy of a shopper's data.
                woken = await self._woken_within(FORGET_PUBLISHED_AFTER_S)
                if not woken:
                    await self._forget_published(conn)
            if not woken:
                woken = await self._woken_within(self._poll_interval_s)
        await self._forget_published(conn)  # a clean stop republishes nothing

    async def _woken_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)
            return True
        return False

    async def _forget_published(self, conn: asyncpg.Connection) -> None:
        if self._published:
            done, self._published = self._published, []
            await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", done)

    async def purge(self, conn: asyncpg.Connection) -> bool:
        """Delete expired outbox, inbox and retained rows, ``purge_batch_size`` a statement.

        Each statement is short and commits alone, so no lock is held for long and the
        session never looks frozen to a standby. Between statements it yields, and gives up
        the round as soon as rows wait to be relayed or the relay stops: True when every
        table is purged, False when interrupted (the caller relays, then calls again).
        """
        tables = [
            ("outbox", "published_at", self._retention),
            ("inbox", "received_at", self._inbox_retention),
            *self._retained,
        ]
        for table, column, retention in tables:
            name, col = quote_ident(table), quote_ident(column)
            # By physical row id: a batch found through the column's index, deleted without
            # a second look-up, and no key column needed (tables differ in their keys).
            statement = (
                f"DELETE FROM {name} WHERE ctid = ANY(ARRAY("
                f"SELECT ctid FROM {name} WHERE {col} < now() - $1::interval LIMIT $2))"
            )
            while True:
                status = await conn.execute(statement, retention, self.purge_batch_size)
                if int(status.split()[-1]) < self.purge_batch_size:
                    break
                await asyncio.sleep(0)
                if self._stopping or self._wakeup.is_set():
                    return False
        return True

    async def _evict_stale_leader(self, conn: asyncpg.Connection, lock: str) -> None:
        """End the leader's session if it has not moved for a lease: a frozen process.

        A live leader runs a statement at least every poll interval and holds a batch open
        for at most ``publish_timeout_s``; a session whose state has not changed for longer
        belongs to a process that stopped (SIGSTOP, a hung host whose kernel still answers
        keepalives) while the server waits for its next message, where no server timeout
        applies.
        """
        evicted = await conn.fetchval(
            "WITH k AS (SELECT " + advisory_key_sql("$1") + " AS key)"
            " SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l, k, pg_stat_activity a"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            "   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            "   AND l.classid = ((k.key >> 32) & 4294967295)::oid"
            "   AND l.objid = (k.key & 4294967295)::oid"
            "   AND a.pid = l.pid AND a.state_change < now() - $2::interval",
            lock,
            timedelta(seconds=self._lease_s),
        )
        if evicted:
            log.warning(
                "outbox relay for %s: evicted a leader silent for over %.0fs",
                self._schema,
                self._lease_s,
            )

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def relay_once(self, conn: asyncpg.Connection) -> int:
        """Publish one batch of pending rows in id order; returns how many were taken.

        Rows the broker refuses for good are parked with their error; any other failure
        leaves the whole batch pending (nothing is marked) for the next round.

        No transaction and no row locks: only the leader relays (its advisory lock), and a
        row published twice (a leader dying before it deleted the rows) is deduplicated by
        consumers anyway. One statement a round: it deletes what the round before published
        and reads what to publish now.
        """
        done, self._published = self._published, []
        try:
            rows = await conn.fetch(
                "WITH gone AS (DELETE FROM outbox WHERE id = ANY($2::bigint[]))"
                " SELECT id, ce_type, topic, key, headers, payload FROM outbox"
                " WHERE published_at IS NULL AND parked_at IS NULL AND id <> ALL($2::bigint[])"
                " ORDER BY id LIMIT $1",
                self._batch_size,
                done,
            )
        except BaseException:
            self._published = done + self._published
            raise
        if not rows:
            return 0
        messages = [
            OutboxMessage(r["id"], r["topic"], r["key"], json.loads(r["headers"]), r["payload"])
            for r in rows
        ]
        try:
            # Bounded: a frozen broker must not keep the session (and its leadership)
            # idle past idle_session_timeout.
            async with asyncio.timeout(self._publish_timeout_s):
                outcomes = await self._publish_all(messages)
        except TimeoutError as exc:
            raise OutboxPublishError("the broker did not acknowledge in time") from exc
        failures = [(m, e) for m, e in zip(messages, outcomes, strict=True) if e is not None]
        for _, exc in failures:
            if not is_unpublishable(exc):
                # Leave the rows pending (none is marked) and note why.
                raise OutboxPublishError(f"{type(exc).__name__}: {exc}") from exc
        published = [m for m, e in zip(messages, outcomes, strict=True) if e is None]
        # Deleted rather than marked (a mark is a new version of every row and of its index
        # entries; the events live on in Kafka), by the next round's read.
        self._published += [m.id for m in published]
        types = {r["id"]: r["ce_type"] for r in rows}
        for message, exc in failures:
            await self._park(conn, message, types[message.id], exc)
        for m in published:
            self._metrics.outbox_published.labels(self._metrics.service, m.topic).inc()
        return len(messages)

    async def _park(
        self, conn: asyncpg.Connection, message: OutboxMessage, ce_type: str, exc: BaseException
    ) -> None:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        await conn.execute(
            "UPDATE outbox SET parked_at = clock_timestamp(), last_error = $2 WHERE id = $1",
            message.id,
            error,
        )
        # Identifiers and the error only: the payload may hold personal data.
        log.error(
            "outbox row %d (%s to %s, %d bytes) parked: %s",
            message.id,
            ce_type,
            message.topic,
            len(message.payload or b""),
            error,
        )
        self._metrics.outbox_parked_rows.labels(self._metrics.service, message.topic).inc()

    async def _publish_all(self, messages: Sequence[OutboxMessage]) -> list[BaseException | None]:
        """Send all, then await all; each message's outcome (None when the broker took it)."""
        outcomes: list[BaseException | None] = [None] * len(messages)
        pending: list[tuple[int, Awaitable[object]]] = []
        for index, message in enumerate(messages):
            token = attach_trace_headers(message.headers)
            try:
                pending.append((index, await self._publish(message)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcomes[index] = exc
                if not is_unpublishable(exc):
                    break  # the broker is unwell: the batch is retried as a whole anyway
            finally:
                detach(token)
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        for (index, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                outcomes[index] = result
        return outcomes

    async def _observe_backlog(self, conn: asyncpg.Connection) -> int:
        """Set the backlog gauges; returns how many rows wait to be published."""
        # Each part matches a partial index (outbox_pending, outbox_parked): published rows,
        # kept for a day, are never scanned (a filtered count over the table read them all,
        # every second: 10 ms at 14,000 rows, and growing with the retention).
        row = await conn.fetchrow(
            "SELECT p.n, extract(epoch FROM now() - p.oldest) AS age,"
            " (SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL"
            "   AND published_at IS NULL) AS parked"
            " FROM (SELECT count(*) AS n, min(created_at) AS oldest FROM outbox"
            "  WHERE published_at IS NULL AND parked_at IS NULL) p"
        )
        service = self._metrics.service
        self._metrics.outbox_backlog.labels(service).set(row["n"] if row else 0)
        self._metrics.outbox_oldest_age.labels(service).set(float(row["age"] or 0) if row else 0)
        self._metrics.outbox_parked.labels(service).set(row["parked"] if row else 0)
        return int(row["n"]) if row else 0


class OutboxPublishError(RuntimeError):
    """The broker did not take a batch; its rows stay in the outbox and are retried."""
