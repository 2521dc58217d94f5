"""Which failures are retried until the world mends, and which are the message's fault."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError
from omni_common.faults import Backoff, is_contention, is_infrastructure_error


def pg_error(cls: type[asyncpg.PostgresError], message: str = "boom") -> asyncpg.PostgresError:
    return cls(message)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError("refused"),
        TimeoutError(),
        OSError("network unreachable"),
        pg_error(asyncpg.CannotConnectNowError),
        pg_error(asyncpg.ConnectionDoesNotExistError),
        pg_error(asyncpg.TooManyConnectionsError),
        pg_error(asyncpg.SerializationError),
        pg_error(asyncpg.DeadlockDetectedError),
        pg_error(asyncpg.QueryCanceledError),  # statement_timeout
        pg_error(asyncpg.LockNotAvailableError),  # lock_timeout
        pg_error(
            asyncpg.ObjectNotInPrerequisiteStateError,
            'database "omni" is not currently accepting connections',
        ),
        asyncpg.InterfaceError("connection is closed"),
        KafkaConnectionError(),
    ],
)
def test_infrastructure_errors_are_recognised(exc: BaseException) -> None:
    assert is_infrastructure_error(exc)


def test_a_cause_in_the_chain_counts() -> None:
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("could not save") from inner
    except RuntimeError as outer:
        assert is_infrastructure_error(outer)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad"),
        KeyError("sku"),
        pg_error(asyncpg.UniqueViolationError),
        pg_error(asyncpg.CheckViolationError),
        pg_error(asyncpg.ObjectNotInPrerequisiteStateError, "some other prerequisite"),
    ],
)
def test_deterministic_failures_are_not_infrastructure(exc: BaseException) -> None:
    assert not is_infrastructure_error(exc)


def test_contention_is_a_lost_race() -> None:
    assert is_contention(pg_error(asyncpg.SerializationError))
    assert is_contention(pg_error(asyncpg.DeadlockDetectedError))
    assert not is_contention(pg_error(asyncpg.CannotConnectNowError))
    assert not is_contention(ValueError())


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.1, 0.5)
    delays = [backoff.next_delay() for _ in range(5)]
    assert 0.08 <= delays[0] <= 0.1
    assert all(d <= 0.5 for d in delays)
    assert delays[-1] >= 0.4
    backoff.reset()
    assert backoff.next_delay() <= 0.1
