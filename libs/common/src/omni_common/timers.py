"""Durable timers: set in a transaction, fired once in another, surviving restarts.

A timer is identified by ``(kind, key)``; setting it again moves it, cancelling removes it.
The firing transaction deletes the row and runs the handler together, so a timer fires
exactly once even with several instances polling (``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import asyncpg

from omni_common.telemetry import attach_trace_headers, current_trace_headers, detach

log = logging.getLogger(__name__)


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
        " payload = EXCLUDED.payload, trace = EXCLUDED.trace",
        kind,
        key,
        due_at,
        json.dumps(dict(payload or {})),
        json.dumps(current_trace_headers()),
    )


async def cancel_timer(conn: asyncpg.Connection, kind: str, key: str) -> bool:
    """Disarm the timer ``(kind, key)``; True if it was armed."""
    return (await conn.execute("DELETE FROM timers WHERE kind = $1 AND key = $2", kind, key)) != (
        "DELETE 0"
    )


# handler(tx, key, payload): runs in the transaction that removes the timer.
TimerHandler = Callable[[Any, str, dict[str, Any]], Awaitable[None]]
# batch handler(tx, [(key, payload), ...]): every due timer of its kind in one transaction,
# oldest deadline first, for handlers that decide many timers with a few set-based queries.
BatchTimerHandler = Callable[[Any, list[tuple[str, dict[str, Any]]]], Awaitable[None]]


class TimerWheel:
    """Polls a service's due timers and fires each once through its kind's handler."""

    def __init__(
        self,
        transaction: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        handlers: Mapping[str, TimerHandler],
        *,
        poll_interval_s: float = 0.5,
        batch_size: int = 100,
        per_transaction: int = 1,
        batch_handlers: Mapping[str, BatchTimerHandler] | None = None,
    ) -> None:
        self._transaction = transaction
        self._handlers = dict(handlers)
        self._batch_handlers = dict(batch_handlers or {})
        self._kinds = [*self._handlers, *self._batch_handlers]
        self._poll_interval_s = poll_interval_s
        self._batch_size = batch_size
        # Timers fired per transaction; more than 1 suits handlers that lock little (their
        # locks are held until the whole batch commits).
        self._per_transaction = max(1, per_transaction)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TimerWheel]:
        """Poll in the background while the context is open."""
        task = asyncio.create_task(self._run(), name="timer-wheel")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                fired = await self.fire_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer wheel round failed")
                fired = 0
            if fired < self._batch_size:
                await asyncio.sleep(self._poll_interval_s)

    async def fire_due(self) -> int:
        """Fire due timers (up to ``batch_size``); returns how many fired.

        Up to ``per_transaction`` timers fire in one transaction: at scale the commit per
        timer is the wheel's main cost. If a handler fails, its batch rolls back and is fired
        again one timer per transaction, so the failure stays with that one timer.
        """
        fired = 0
        while fired < self._batch_size:
            want = min(self._per_transaction, self._batch_size - fired)
            try:
                n = await self._fire(want)
            except Exception:
                if want == 1:
                    raise
                log.warning("a timer batch failed; firing it one timer at a time", exc_info=True)
                n = 0
                for _ in range(want):
                    one = await self._fire(1)
                    n += one
                    if not one:
                        break
            fired += n
            if n < want:
                break
        return fired

    async def _fire(self, limit: int) -> int:
        async with self._transaction() as tx:
            rows = await tx.conn.fetch(
                "DELETE FROM timers WHERE (kind, key) IN ("
                "  SELECT kind, key FROM timers WHERE due_at <= now() AND kind = ANY($1)"
                "  ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED"
                ") RETURNING kind, key, payload, trace, due_at",
                self._kinds,
                limit,
            )
            batches: dict[str, list[tuple[str, dict[str, Any]]]] = {}
            for row in sorted(rows, key=lambda r: (r["due_at"], r["key"])):
                if row["kind"] in self._batch_handlers:
                    batches.setdefault(row["kind"], []).append(
                        (row["key"], json.loads(row["payload"]))
                    )
                    continue
                token = attach_trace_headers(json.loads(row["trace"]))
                try:
                    await self._handlers[row["kind"]](tx, row["key"], json.loads(row["payload"]))
                finally:
                    detach(token)
            for kind, due in batches.items():
                await self._batch_handlers[kind](tx, due)
        return len(rows)
