"""A service stopped under load drains in order and its successor repeats nothing.

Stop fetching, finish the messages in hand, commit, stop the relay, leave the group: the
next instance starts exactly after the last handled message, so no handled message is
handled again and nothing is lost.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from omni_common.service import ServiceRuntime
from omni_devkit.testing.chaos import EffectCounter, Figures, adjustment, wait_for
from omni_devkit.testing.events import ChannelPublisher

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


async def test_a_graceful_restart_under_load_repeats_and_loses_nothing(omni_env) -> None:
    figures = Figures("graceful restart under load")
    # A long commit interval: only the drain's own commit can spare the successor repeats.
    settings = omni_env.settings("chaos", consumer_commit_interval_ms=60_000)
    first = await EffectCounter(ServiceRuntime(settings), delay_s=0.01).start()
    events = [adjustment(f"SKU-{i % 6}") for i in range(300)]
    async with ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
        sending = asyncio.gather(*(channel.publish(e) for e in events))

        async def some_applied() -> bool:
            return (await first.effects())[0] >= 60

        await wait_for(some_applied, timeout=30)
        stopped_at = time.monotonic()
        await first.runtime.stop()  # what SIGTERM does (omni_common.run)
        applied_by_first = sum(first.calls.values())
        await sending
    figures.sent = len(events)
    # Same group, same schema: the next pod of the deployment.
    second = EffectCounter(ServiceRuntime(settings))
    await second.start()
    try:

        async def all_applied() -> bool:
            return (await second.effects())[0] >= len(events)

        await wait_for(all_applied, timeout=40)
        figures.recovered_s = time.monotonic() - stopped_at
        figures.applied, figures.duplicates = await second.effects()
        repeated = set(first.calls) & set(second.calls)
        figures.extra["handled_before_stop"] = applied_by_first
        figures.extra["handled_again"] = len(repeated)
        figures.report()
        assert figures.applied == figures.sent
        assert figures.duplicates == 0
        assert not repeated, "the drain did not commit what it handled"
    finally:
        await second.runtime.stop()
