"""Durable timers under faults: a failing timer never blocks the others."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from omni_common.service import ServiceRuntime
from omni_common.timers import TimerWheel, set_timer

pytestmark = pytest.mark.integration


async def test_a_failing_timer_is_retried_with_backoff_then_dead_and_never_blocks_others(
    omni_env,
) -> None:
    runtime = ServiceRuntime(omni_env.settings("timed"))
    await runtime.start()
    fired: list[str] = []
    flaky_calls = 0

    async def ok(tx: Any, key: str, payload: dict[str, Any]) -> None:
        fired.append(key)

    async def flaky(tx: Any, key: str, payload: dict[str, Any]) -> None:
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls <= 2:
            raise RuntimeError("not yet")
        fired.append(key)

    async def poison(tx: Any, key: str, payload: dict[str, Any]) -> None:
        await tx.conn.execute("SELECT 1")  # a partial effect, rolled back with the failure
        raise ValueError(f"cannot handle {payload['what']}")

    wheel = TimerWheel(
        runtime.transaction,
        {"ok": ok, "flaky": flaky, "poison": poison},
        poll_interval_s=0.05,
        max_attempts=3,
        retry_initial_s=0.1,
        retry_max_s=0.2,
        metrics=runtime.metrics,
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
