"""Consumer-side chaos: crashes mid-effect, poison among valid, fail-then-succeed, slow
handlers. Each ends with 0 lost, 0 visible duplicates, 0 valid events dead-lettered."""

from __future__ import annotations

import json
import time

import pytest
from omni_common.service import ServiceRuntime
from omni_contracts import StockAdjusted
from omni_devkit.testing.chaos import EffectCounter, Figures, adjustment, wait_for
from omni_devkit.testing.events import ChannelPublisher, ce_headers, record_headers

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

TOPIC = EffectCounter.TOPIC


async def run_scenario(
    omni_env,
    figures: Figures,
    events: list[StockAdjusted],
    counter: EffectCounter,
    *,
    poison: int = 0,
    timeout: float = 40.0,  # noqa: ASYNC109
) -> None:
    """Send ``events`` (and ``poison`` broken messages among them), wait, check, report."""
    dlq = omni_env.reader(f"{TOPIC}.dlq")
    async with dlq, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
        started = time.monotonic()
        for i, event in enumerate(events):
            if poison and i % (len(events) // poison) == 0:
                await channel.publish_raw(
                    TOPIC,
                    b'{"not": "an adjustment"',
                    key=event.sku,
                    headers=ce_headers("inventory.stock.adjusted"),
                )
            await channel.publish(event)
        figures.sent = len(events)

        async def all_applied() -> bool:
            return (await counter.effects())[0] >= len(events)

        await wait_for(all_applied, timeout=timeout)
        figures.recovered_s = time.monotonic() - started
        figures.applied, figures.duplicates = await counter.effects()
        dead = await dlq.collect(len(events), timeout=2 if poison else 1)
        valid_dead = [r for r in dead if record_headers(r)["dlq_reason"] != "malformed_json"]
        figures.dead_lettered = len(valid_dead)
        figures.extra["poison_dead_lettered"] = len(dead) - len(valid_dead)
    figures.report()
    assert figures.applied == figures.sent
    assert figures.duplicates == 0
    assert figures.dead_lettered == 0, [record_headers(r)["dlq_error"] for r in valid_dead]
    assert figures.extra["poison_dead_lettered"] == poison


async def test_handler_crash_mid_effect_x50(omni_env) -> None:
    """50 events crash after writing their effect, before the commit: each applies once."""
    crashed: set[str] = set()

    async def crash_once(event: StockAdjusted, attempt: int) -> None:
        if len(crashed) < 50 and event.adjustment_id not in crashed:
            crashed.add(event.adjustment_id)
            raise RuntimeError("process died mid-effect")  # the transaction rolls back

    counter = await EffectCounter(ServiceRuntime(omni_env.settings("chaos")), crash_once).start()
    try:
        figures = Figures("handler crash mid-effect x50")
        events = [adjustment(f"SKU-{i % 9}") for i in range(120)]
        await run_scenario(omni_env, figures, events, counter)
        assert len(crashed) == 50
    finally:
        await counter.runtime.stop()


async def test_poison_messages_among_valid_ones(omni_env) -> None:
    counter = await EffectCounter(ServiceRuntime(omni_env.settings("chaos"))).start()
    try:
        figures = Figures("poison message among valid ones")
        events = [adjustment(f"SKU-{i % 5}") for i in range(100)]
        await run_scenario(omni_env, figures, events, counter, poison=4)
    finally:
        await counter.runtime.stop()


async def test_fail_then_succeed_is_never_skipped(omni_env) -> None:
    """Every event fails twice (the database answering), then succeeds: none is skipped."""

    async def fail_twice(event: StockAdjusted, attempt: int) -> None:
        if attempt <= 2:
            raise ConnectionResetError("connection reset mid-transaction")

    counter = await EffectCounter(ServiceRuntime(omni_env.settings("chaos")), fail_twice).start()
    try:
        figures = Figures("fail-then-succeed")
        events = [adjustment(f"SKU-{i % 7}") for i in range(60)]
        await run_scenario(omni_env, figures, events, counter)
        assert all(n == 3 for n in counter.calls.values()), counter.calls
    finally:
        await counter.runtime.stop()


async def test_slow_handler_longer_than_the_session_timeout(omni_env) -> None:
    """Handlers slower than the group session timeout: the member stays, nothing repeats."""
    settings = omni_env.settings("chaos", consumer_session_timeout_ms=2_000)
    counter = EffectCounter(ServiceRuntime(settings), delay_s=2.5)
    await counter.start()
    try:
        figures = Figures("slow handler (2.5 s > 2 s session timeout)")
        # Six keys: spread over the partitions, handled concurrently, several per partition.
        events = [adjustment(f"SKU-{i % 6}") for i in range(12)]
        await run_scenario(omni_env, figures, events, counter, timeout=50)
        assert max(counter.calls.values()) == 1, "a slow message was delivered again"
        out = omni_env.reader("inventory.availability.v1")
        async with out:
            told = await out.collect(len(events), timeout=15)
        assert len({json.loads(r.value)["sku"] for r in told}) == 6
    finally:
        await counter.runtime.stop()
