"""Which failures are the world's fault (retry until it mends) and which are the message's.

A handler that fails because the database or the broker is away must not send a valid event
to the DLQ: it is retried, with capped backoff, until the infrastructure answers again. Only
a failure that persists while the infrastructure is healthy is the message's own fault.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import asyncpg
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError

log = logging.getLogger(__name__)

# SQLSTATE classes that say "the server, not your statement": connection exception (08),
# transaction rollback: serialization failure, deadlock (40), insufficient resources such
# as too many connections (53), operator intervention: shutdown, cannot connect now (57P).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P")
# 55P03 lock_not_available (lock_timeout), 57014 query_canceled (statement_timeout).
_TRANSIENT_SQLSTATES = frozenset({"55P03", "57014"})
# Contention: the database answers, but this transaction lost a race; trying again helps.
_CONTENTION_SQLSTATES = frozenset({"40001", "40P01", "55P03"})

_INFRASTRUCTURE_TYPES: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionRefusedError, ConnectionResetError, socket errors
    TimeoutError,  # pool acquire timeouts, asyncio.timeout
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the database or broker is unwell."""
    for e in _chain(exc):
        if isinstance(e, _INFRASTRUCTURE_TYPES):
            return True
        state = _sqlstate(e)
        if state.startswith(_TRANSIENT_SQLSTATE_PREFIXES) or state in _TRANSIENT_SQLSTATES:
            return True
        # 55000 as a database being closed to connections answers (ALLOW_CONNECTIONS false).
        if state == "55000" and "accepting connections" in str(e):
            return True
    return False


def is_contention(exc: BaseException) -> bool:
    """True for a lost race (serialization failure, deadlock, lock timeout): retry it."""
    return any(_sqlstate(e) in _CONTENTION_SQLSTATES for e in _chain(exc))


HealthCheck = Callable[[], Awaitable[str | None]]
"""``async () -> None`` when the infrastructure answers, else why not."""


class Backoff:
    """Capped exponential backoff with jitter (so recovering consumers do not stampede)."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next = initial_s

    def reset(self) -> None:
        """Start again from the initial delay."""
        self._next = self.initial_s

    def next_delay(self) -> float:
        """The delay to wait now; the following one doubles, up to the cap."""
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay * random.uniform(0.8, 1.0)

    async def sleep(self) -> None:
        """Wait the next delay."""
        await asyncio.sleep(self.next_delay())


async def wait_until_healthy(check: HealthCheck, backoff: Backoff, what: str) -> float:
    """Probe until ``check`` passes; returns how long the outage lasted (seconds)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reported = False
    while (problem := await check()) is not None:
        if not reported:
            log.warning("%s waits for the infrastructure: %s", what, problem)
            reported = True
        await backoff.sleep()
    waited = loop.time() - started
    if reported:
        log.info("%s resumes after %.1fs", what, waited)
    return waited
