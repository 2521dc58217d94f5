"""Durable timers: set in a transaction, fired once in another, surviving restarts.

A timer is identified by ``(kind, key)``; setting it again moves it, cancelling removes it.
The firing transaction deletes the row and runs the handler together, so a timer fires
exactly once even with several instances polling (``FOR UPDATE SKIP LOCKED``).

A handler that fails never blocks the other timers: the failure is counted on the row and
the timer tried again later with backoff (``attempts``, ``next_attempt_at``); after
``max_attempts`` it moves to ``dead_timers`` with its error. A failure because the database
is away is not the timer's fault: the round stops and is tried again, nothing is counted.
An infrastructure-looking error while the database answers is the timer's own (a call that
timed out, a statement cancelled), so it is counted on that timer like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from omni_common.faults import Backoff, HealthCheck, is_infrastructure_error
from omni_common.handlers import Due
from omni_common.logging import redact
from omni_common.metrics import PlatformMetrics
from omni_common.telemetry import attach_trace_headers, current_trace_headers, detach

log = logging.getLogger(__name__)

# The wheels running in this process: set_timer tells them of a deadline they must not
# sleep past (the row is not visible yet, only once the caller commits).
_WHEELS: list[TimerWheel] = []


async def set_timer(
    conn: asyncpg.Connection,
    kind: str,
    key: str,
    due_at: datetime,
    payload: Mapping[str, Any] | None = None,
) -> None:
    """Arm (or re-arm) the timer ``(kind, key)`` in the caller's transaction."""
    await conn.execute(
        "INSERT INTO timers (kind, key, due_at, payload, trace) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (kind, key) DO UPDATE SET due_at = EXCLUDED.due_at,"
        " payload = EXCLUDED.payload, trace = EXCLUDED.trace,"
        " attempts = 0, next_attempt_at = NULL, last_error = NULL",
        kind,
        key,
        due_at,
        json.dumps(dict(payload or {})),
        json.dumps(current_trace_headers()),
    )
    for wheel in _WHEELS:
        wheel.armed(kind, due_at)


async def set_timers(
    conn: asyncpg.Connection,
    kind: str,
    timers: Sequence[tuple[str, datetime, Mapping[str, Any] | None, Mapping[str, str] | None]],
) -> None:
    """Arm (or re-arm) many timers of ``kind`` in one statement: ``(key, due_at, payload,
    trace headers)`` each (no trace headers: the current trace's)."""
    if not timers:
        return
    here = json.dumps(current_trace_headers())
    await conn.execute(
        "INSERT INTO timers (kind, key, due_at, payload, trace)"
        " SELECT $1, * FROM unnest($2::text[], $3::timestamptz[], $4::jsonb[], $5::jsonb[])"
        " ON CONFLICT (kind, key) DO UPDATE SET due_at = EXCLUDED.due_at,"
        " payload = EXCLUDED.payload, trace = EXCLUDED.trace,"
        " attempts = 0, next_attempt_at = NULL, last_error = NULL",
        kind,
        [key for key, _, _, _ in timers],
        [due for _, due, _, _ in timers],
        [json.dumps(dict(payload or {})) for _, _, payload, _ in timers],
        [here if trace is None else json.dumps(dict(trace)) for _, _, _, trace in timers],
    )
    soonest = min(due for _, due, _, _ in timers)
    for wheel in _WHEELS:
        wheel.armed(kind, soonest)


async def cancel_timers(conn: asyncpg.Connection, kind: str, keys: Collection[str]) -> set[str]:
    """Disarm the timers of ``kind`` for ``keys`` in one statement; returns the keys that were
    armed (their rows are taken in key order: an index scan of the sorted keys)."""
    if not keys:
        return set()
    rows = await conn.fetch(
        "DELETE FROM timers WHERE kind = $1 AND key = ANY($2::text[]) RETURNING key",
        kind,
        sorted(keys),
    )
    return {r["key"] for r in rows}


async def cancel_timer(conn: asyncpg.Connection, kind: str, key: str) -> bool:
    """Disarm the timer ``(kind, key)``; True if it was armed."""
    return (await conn.execute("DELETE FROM timers WHERE kind = $1 AND key = $2", kind, key)) != (
        "DELETE 0"
    )


TimerHandler = Callable[[list[Due], Any], Awaitable[None]]
"""A timer handler with its dependencies bound: ``(due, tx)``, the due timers of its kind
(oldest deadline first) in the transaction that removes them (see omni_common.handlers)."""


class _TimerFailed(Exception):
    """A handler failed on ``rows`` (its transaction rolled back); the cause is ``error``."""

    def __init__(self, rows: list[Any], error: Exception) -> None:
        super().__init__(str(error))
        self.rows = rows
        self.error = error


class TimerWheel:
    """Polls a service's due timers and fires each once through its kind's handler."""

    def __init__(
        self,
        transaction: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        handlers: Mapping[str, TimerHandler],
        *,
        metrics: PlatformMetrics,
        health: HealthCheck,
        poll_interval_s: float = 0.5,
        batch_size: int = 100,
        per_transaction: int = 1,
        max_attempts: int = 8,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 300.0,
        idle_poll_s: float = 5.0,
        concurrency: int = 1,
    ) -> None:
        self._transaction = transaction
        self._handlers = dict(handlers)
        self._kinds = list(self._handlers)
        self._health = health
        self._poll_interval_s = poll_interval_s
        self._batch_size = batch_size
        # Timers fired per transaction; more than 1 suits handlers that lock little (their
        # locks are held until the whole batch commits).
        self._per_transaction = max(1, per_transaction)
        self._max_attempts = max_attempts
        # Transactions fired at once when many timers are due (each holds a connection).
        self._concurrency = max(1, concurrency)
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._metrics = metrics
        # With nothing due soon the wheel sleeps until the next deadline, at most this long:
        # timers this process arms wake it earlier (``armed``); this bounds the delay for
        # timers armed by other instances (or written by hand) meanwhile.
        self._idle_poll_s = max(idle_poll_s, poll_interval_s)
        self._wake_at = 0.0
        self._woken = asyncio.Event()

    def armed(self, kind: str, due_at: datetime) -> None:
        """A timer of ``kind`` was armed in this process: do not sleep past its deadline.

        It is polled for no sooner than one poll interval from now, by when the arming
        transaction has normally committed (if not, the next round finds it).
        """
        if kind not in self._kinds:
            return
        loop = asyncio.get_running_loop()
        due_in = (due_at - datetime.now(due_at.tzinfo)).total_seconds()
        at = loop.time() + max(due_in, self._poll_interval_s)
        if at < self._wake_at:
            self._wake_at = at
            self._woken.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TimerWheel]:
        """Poll in the background while the context is open."""
        task = asyncio.create_task(self._run(), name="timer-wheel")
        _WHEELS.append(self)
        try:
            yield self
        finally:
            _WHEELS.remove(self)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        outage = Backoff(self._poll_interval_s, max(self._poll_interval_s, 5.0))
        while True:
            try:
                fired = await self.fire_due()
                outage.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The database is away (or the failure could not even be recorded).
                log.warning("timer wheel round failed: %s: %s", type(exc).__name__, exc)
                await outage.sleep()
                continue
            if fired < self._batch_size:
                try:
                    await self._sleep_until_due()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("timer wheel could not look ahead: %s: %s", type(exc).__name__, exc)
                    await outage.sleep()

    async def _sleep_until_due(self) -> None:
        """Sleep until the next deadline known to the database or armed here meanwhile,
        at least a poll interval and at most ``idle_poll_s``."""
        loop = asyncio.get_running_loop()
        async with self._transaction() as tx:
            due_in = await tx.conn.fetchval(
                "SELECT extract(epoch FROM coalesce(next_attempt_at, due_at) - now())"
                " FROM timers WHERE kind = ANY($1)"
                " ORDER BY coalesce(next_attempt_at, due_at) LIMIT 1",
                self._kinds,
            )
        delay = self._idle_poll_s if due_in is None else float(due_in)
        self._wake_at = loop.time() + min(max(delay, self._poll_interval_s), self._idle_poll_s)
        while (remaining := self._wake_at - loop.time()) > 0:
            self._woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), remaining)

    async def fire_due(self) -> int:
        """Fire due timers (up to ``batch_size``); returns how many were tried.

        Up to ``per_transaction`` timers fire in one transaction: at scale the commit per
        timer is the wheel's main cost. If a handler fails, its batch rolls back and is fired
        again one timer per transaction, so the failure stays with that one timer, which is
        rescheduled with backoff (or, after its last attempt, moved to ``dead_timers``) while
        the round goes on. An infrastructure error ends the round (raised, nothing counted).
        """
        fired = 0
        while fired < self._batch_size:
            want = min(self._per_transaction, self._batch_size - fired)
            lanes = max(1, min(self._concurrency, (self._batch_size - fired) // want))
            if lanes == 1:
                n = await self._fire_some(want)
            else:
                # Several transactions at once (SKIP LOCKED keeps them apart): one waits on
                # the database while another decides.
                results = await asyncio.gather(
                    *(self._fire_some(want) for _ in range(lanes)), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                n = sum(r for r in results if isinstance(r, int))
            fired += n
            if n < want * lanes:
                break
        return fired

    async def _fire_some(self, want: int) -> int:
        """Fire up to ``want`` due timers in one transaction (one by one if it fails)."""
        if want == 1:
            return await self._fire_single()
        try:
            return await self._fire(want)
        except _TimerFailed as failed:
            if await self._world_failed(failed.error):
                raise failed.error from None
            log.warning("a timer batch failed; firing it one timer at a time")
            n = 0
            for _ in range(want):
                one = await self._fire_single()
                n += one
                if not one:
                    break
            return n

    async def _fire_single(self) -> int:
        try:
            return await self._fire(1)
        except _TimerFailed as failed:
            if await self._world_failed(failed.error):
                raise failed.error from None
            for row in failed.rows:
                await self._failed(row, failed.error)
            return 1

    async def _world_failed(self, error: Exception) -> bool:
        """Whether ``error`` is the database being away (the round stops, nothing counted),
        rather than the timer's own failure."""
        if not is_infrastructure_error(error):
            return False
        try:
            return await self._health() is not None
        except Exception:
            return True

    async def _fire(self, limit: int) -> int:
        async with self._transaction() as tx:
            rows = await tx.conn.fetch(
                "DELETE FROM timers WHERE (kind, key) IN ("
                "  SELECT kind, key FROM timers"
                "  WHERE coalesce(next_attempt_at, due_at) <= now() AND kind = ANY($1)"
                "  ORDER BY coalesce(next_attempt_at, due_at) LIMIT $2 FOR UPDATE SKIP LOCKED"
                ") RETURNING kind, key, payload, trace, due_at, attempts",
                self._kinds,
                limit,
            )
            by_kind: dict[str, list[Any]] = {}
            for row in sorted(rows, key=lambda r: (r["due_at"], r["key"])):
                by_kind.setdefault(row["kind"], []).append(row)
            for kind, due in by_kind.items():
                # The trace the first timer was armed in (the only one, timer by timer).
                token = attach_trace_headers(json.loads(due[0]["trace"]))
                tx.origin = f"timer {kind}"
                try:
                    await self._handlers[kind](
                        [Due(r["key"], json.loads(r["payload"]), r["due_at"]) for r in due], tx
                    )
                except Exception as exc:
                    raise _TimerFailed(due, exc) from exc
                finally:
                    detach(token)
        return len(rows)

    async def _failed(self, row: Any, exc: Exception) -> None:
        """Count a failed firing (its transaction rolled back, so the row is back)."""
        attempts = row["attempts"] + 1
        # Kept in the table (dead_timers outlives an erasure of whom it quotes): masked.
        error = redact(f"{type(exc).__name__}: {exc}")[:2000]
        kind, key = row["kind"], row["key"]
        async with self._transaction() as tx:
            if attempts >= self._max_attempts:
                moved = await tx.conn.fetchval(
                    "WITH dead AS ("
                    "  DELETE FROM timers WHERE kind = $1 AND key = $2 AND due_at = $3"
                    "  RETURNING kind, key, due_at, payload, trace"
                    ") INSERT INTO dead_timers (kind, key, due_at, payload, trace, attempts,"
                    " last_error) SELECT kind, key, due_at, payload, trace, $4, $5 FROM dead"
                    " RETURNING true",
                    kind,
                    key,
                    row["due_at"],
                    attempts,
                    error,
                )
                if moved:
                    log.error("timer %s %s dead after %d attempts: %s", kind, key, attempts, error)
                    self._count("dead", kind)
                return
            delay = min(self._retry_initial_s * 2 ** (attempts - 1), self._retry_max_s)
            # Guarded by due_at: a timer re-armed meanwhile starts afresh instead.
            await tx.conn.execute(
                "UPDATE timers SET attempts = $4, last_error = $5,"
                " next_attempt_at = now() + make_interval(secs => $6)"
                " WHERE kind = $1 AND key = $2 AND due_at = $3",
                kind,
                key,
                row["due_at"],
                attempts,
                error,
                delay,
            )
        log.warning(
            "timer %s %s failed (attempt %d), retrying in %.1fs: %s",
            kind,
            key,
            attempts,
            delay,
            error,
        )
        self._count("retried", kind)

    def _count(self, outcome: str, kind: str) -> None:
        m = self._metrics
        m.timers_failed.labels(m.service, kind, outcome).inc()
