"""Durable timers against a real PostgreSQL: fired once, in batches, failures kept apart."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from omni_common.db import create_pool, migrate
from omni_common.handlers import Due
from omni_common.metrics import PlatformMetrics
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_common.timers import TimerWheel, set_timer
from omni_devkit.devstack.postgres import create_database, drop_database

pytestmark = pytest.mark.integration


class _Tx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.origin: str | None = None


async def _healthy() -> str | None:
    return None


def _wheel(transaction: Any, handlers: dict[str, Any], **options: Any) -> TimerWheel:
    return TimerWheel(
        transaction, handlers, metrics=PlatformMetrics("timers"), health=_healthy, **options
    )


@contextlib.asynccontextmanager
async def _database(postgres_url: str) -> AsyncIterator[Any]:
    name = f"timers{uuid.uuid4().hex[:8]}"
    settings = ServiceSettings(
        service_name="timers", database_url=await create_database(postgres_url, name)
    )
    await migrate(settings)
    pool = await create_pool(settings)
    try:
        yield pool
    finally:
        await pool.close()
        await drop_database(postgres_url, name)


async def test_a_batch_fires_every_due_timer_once(postgres_url: str) -> None:
    async with _database(postgres_url) as pool:
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            for n in range(25):
                await set_timer(conn, "k", f"due-{n:02d}", now - timedelta(seconds=25 - n))
            await set_timer(conn, "k", "later", now + timedelta(hours=1))
        fired: list[str] = []

        async def handler(due: list[Due], tx: _Tx) -> None:
            await tx.conn.execute("SELECT 1")
            fired.extend(timer.key for timer in due)

        @contextlib.asynccontextmanager
        async def transaction() -> AsyncIterator[_Tx]:
            async with pool.acquire() as conn, conn.transaction():
                yield _Tx(conn)

        wheel = _wheel(transaction, {"k": handler}, batch_size=100, per_transaction=10)
        assert await wheel.fire_due() == 25
        assert fired == [f"due-{n:02d}" for n in range(25)]  # oldest deadline first
        assert await wheel.fire_due() == 0
        assert await pool.fetchval("SELECT array_agg(key) FROM timers") == ["later"]


async def test_a_failed_batch_is_fired_again_one_timer_at_a_time(postgres_url: str) -> None:
    async with _database(postgres_url) as pool:
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            for n in range(5):
                await set_timer(conn, "k", f"t{n}", now - timedelta(seconds=10 - n))
        fired: list[str] = []

        async def handler(due: list[Due], tx: _Tx) -> None:
            for timer in due:
                if timer.key == "t3":
                    raise RuntimeError("boom")
                fired.append(timer.key)

        @contextlib.asynccontextmanager
        async def transaction() -> AsyncIterator[_Tx]:
            async with pool.acquire() as conn, conn.transaction():
                yield _Tx(conn)

        wheel = _wheel(transaction, {"k": handler}, per_transaction=5)
        await wheel.fire_due()
        # The batch rolled back, then fired one by one: the failing timer is rescheduled
        # with its error and the ones after it still fire.
        assert fired[-4:] == ["t0", "t1", "t2", "t4"]
        row = await pool.fetchrow(
            "SELECT key, attempts, last_error, next_attempt_at > now() AS later FROM timers"
        )
        assert dict(row) == {
            "key": "t3",
            "attempts": 1,
            "last_error": "RuntimeError: boom",
            "later": True,
        }


async def test_a_handler_gets_every_due_timer_of_its_kind_at_once(postgres_url: str) -> None:
    async with _database(postgres_url) as pool:
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            for n in range(7):
                await set_timer(conn, "many", f"m{n}", now - timedelta(seconds=10 - n), {"n": n})
            await set_timer(conn, "one", "o", now - timedelta(seconds=1))
        calls: list[list[Due]] = []
        singles: list[str] = []

        async def batch(due: list[Due], tx: _Tx) -> None:
            await tx.conn.execute("SELECT 1")
            calls.append(due)

        async def single(due: list[Due], tx: _Tx) -> None:
            singles.extend(timer.key for timer in due)

        @contextlib.asynccontextmanager
        async def transaction() -> AsyncIterator[_Tx]:
            async with pool.acquire() as conn, conn.transaction():
                yield _Tx(conn)

        wheel = _wheel(transaction, {"one": single, "many": batch}, per_transaction=5)
        assert await wheel.fire_due() == 8
        assert [[timer.key for timer in call] for call in calls] == [
            ["m0", "m1", "m2", "m3", "m4"],  # the five oldest deadlines, in one transaction
            ["m5", "m6"],
        ]
        assert calls[0][0].payload == {"n": 0} and singles == ["o"]
        assert await pool.fetchval("SELECT count(*) FROM timers") == 0


async def test_a_failing_timer_is_retried_with_backoff_then_dead_and_never_blocks_others(
    omni_env,
) -> None:
    runtime = ServiceRuntime(omni_env.settings("timed"))
    await runtime.start()
    fired: list[str] = []
    flaky_calls = 0

    async def ok(due: list[Due], tx: Any) -> None:
        fired.extend(timer.key for timer in due)

    async def flaky(due: list[Due], tx: Any) -> None:
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls <= 2:
            raise RuntimeError("not yet")
        fired.extend(timer.key for timer in due)

    async def poison(due: list[Due], tx: Any) -> None:
        await tx.conn.execute("SELECT 1")  # a partial effect, rolled back with the failure
        raise ValueError(f"cannot handle {due[0].payload['what']}")

    wheel = TimerWheel(
        runtime.transaction,
        {"ok": ok, "flaky": flaky, "poison": poison},
        poll_interval_s=0.05,
        max_attempts=3,
        retry_initial_s=0.1,
        retry_max_s=0.2,
        metrics=runtime.metrics,
        health=runtime.database_problem,
    )
    past = datetime.now(UTC) - timedelta(minutes=1)
    try:
        async with runtime.transaction() as tx:
            # The poison timer is the oldest: on the old code it came first in every round.
            await set_timer(tx.conn, "poison", "p1", past - timedelta(minutes=1), {"what": "x"})
            for i in range(5):
                await set_timer(tx.conn, "ok", f"ok-{i}", past)
            await set_timer(tx.conn, "flaky", "f1", past)
        async with wheel.running():
            deadline = asyncio.get_running_loop().time() + 15
            while len(fired) < 6 or await runtime.pool.fetchval("SELECT count(*) FROM timers"):
                assert asyncio.get_running_loop().time() < deadline, (fired, flaky_calls)
                await asyncio.sleep(0.05)
        assert sorted(fired) == sorted([f"ok-{i}" for i in range(5)] + ["f1"])
        assert flaky_calls == 3  # failed twice, then fired once: never skipped
        dead = await runtime.pool.fetch("SELECT kind, key, attempts, last_error FROM dead_timers")
        assert [(r["kind"], r["key"], r["attempts"]) for r in dead] == [("poison", "p1", 3)]
        assert "cannot handle x" in dead[0]["last_error"]
        m = runtime.metrics
        assert m.timers_failed.labels("timed", "poison", "dead")._value.get() == 1
        assert m.timers_failed.labels("timed", "flaky", "retried")._value.get() == 2
    finally:
        await runtime.stop()


async def test_an_infrastructure_error_of_one_timer_does_not_stall_the_wheel(
    omni_env,
) -> None:
    """A timer whose handler fails with what looks like an outage (a refused connection to
    something of its own) while the database answers is that timer's failure: the others
    fire. On the old code every round stopped at it, and nothing behind it ever fired."""
    runtime = ServiceRuntime(omni_env.settings("stalled"))
    await runtime.start()
    fired: list[str] = []

    async def ok(due: list[Due], tx: Any) -> None:
        fired.extend(timer.key for timer in due)

    async def unreachable(due: list[Due], tx: Any) -> None:
        raise ConnectionRefusedError("the thing this timer calls is down")

    wheel = TimerWheel(
        runtime.transaction,
        {"ok": ok, "unreachable": unreachable},
        poll_interval_s=0.05,
        max_attempts=2,
        retry_initial_s=5,
        metrics=runtime.metrics,
        health=runtime.database_problem,
    )
    past = datetime.now(UTC) - timedelta(minutes=1)
    try:
        async with runtime.transaction() as tx:
            await set_timer(tx.conn, "unreachable", "u1", past - timedelta(minutes=1))
            for i in range(3):
                await set_timer(tx.conn, "ok", f"ok-{i}", past)
        async with wheel.running():
            deadline = asyncio.get_running_loop().time() + 10
            while len(fired) < 3:
                assert asyncio.get_running_loop().time() < deadline, fired
                await asyncio.sleep(0.05)
        row = await runtime.pool.fetchrow("SELECT attempts, last_error FROM timers")
        assert row["attempts"] == 1 and "ConnectionRefusedError" in row["last_error"]
    finally:
        await runtime.stop()
