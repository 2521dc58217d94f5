"""Durable timers against a real PostgreSQL: fired once, in batches, failures kept apart."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from omni_common.db import create_pool, migrate
from omni_common.settings import ServiceSettings
from omni_common.timers import TimerWheel, set_timer
from omni_devkit.devstack.postgres import create_database, drop_database

pytestmark = pytest.mark.integration


class _Tx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn


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

        async def handler(tx: _Tx, key: str, payload: dict[str, Any]) -> None:
            await tx.conn.execute("SELECT 1")
            fired.append(key)

        @contextlib.asynccontextmanager
        async def transaction() -> AsyncIterator[_Tx]:
            async with pool.acquire() as conn, conn.transaction():
                yield _Tx(conn)

        wheel = TimerWheel(transaction, {"k": handler}, batch_size=100, per_transaction=10)
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

        async def handler(tx: _Tx, key: str, payload: dict[str, Any]) -> None:
            if key == "t3":
                raise RuntimeError("boom")
            fired.append(key)

        @contextlib.asynccontextmanager
        async def transaction() -> AsyncIterator[_Tx]:
            async with pool.acquire() as conn, conn.transaction():
                yield _Tx(conn)

        wheel = TimerWheel(transaction, {"k": handler}, per_transaction=5)
        with pytest.raises(RuntimeError, match="boom"):
            await wheel.fire_due()
        # The batch rolled back, then fired one by one up to the failing timer.
        assert fired[-3:] == ["t0", "t1", "t2"]
        assert sorted(await pool.fetchval("SELECT array_agg(key) FROM timers")) == ["t3", "t4"]


async def test_a_batch_handler_gets_every_due_timer_of_its_kind_at_once(postgres_url: str) -> None:
    async with _database(postgres_url) as pool:
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            for n in range(7):
                await set_timer(conn, "many", f"m{n}", now - timedelta(seconds=10 - n), {"n": n})
            await set_timer(conn, "one", "o", now - timedelta(seconds=1))
        calls: list[list[tuple[str, dict[str, Any]]]] = []
        singles: list[str] = []

        async def batch(tx: _Tx, due: list[tuple[str, dict[str, Any]]]) -> None:
            await tx.conn.execute("SELECT 1")
            calls.append(due)

        async def single(tx: _Tx, key: str, payload: dict[str, Any]) -> None:
            singles.append(key)

        @contextlib.asynccontextmanager
        async def transaction() -> AsyncIterator[_Tx]:
            async with pool.acquire() as conn, conn.transaction():
                yield _Tx(conn)

        wheel = TimerWheel(
            transaction, {"one": single}, per_transaction=5, batch_handlers={"many": batch}
        )
        assert await wheel.fire_due() == 8
        assert [[key for key, _ in call] for call in calls] == [
            ["m0", "m1", "m2", "m3", "m4"],  # the five oldest deadlines, in one transaction
            ["m5", "m6"],
        ]
        assert calls[0][0][1] == {"n": 0} and singles == ["o"]
        assert await pool.fetchval("SELECT count(*) FROM timers") == 0
