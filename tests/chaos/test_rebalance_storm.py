"""Rebalance storm: members of one consumer group join and leave every few seconds under load.

In-process members join and leave gracefully (drain, commit, leave the group); member
processes are killed -9 while they handle messages (no drain, no commit, no leave: the group
waits out their session). Every event is applied exactly once (the inbox turns redeliveries
into no-ops), nothing is dead-lettered, and every effect's outgoing event is published.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from asyncio.subprocess import PIPE

import pytest
from omni_common.kafka import RebalanceListener
from omni_common.service import ServiceRuntime
from omni_devkit.testing.chaos import EffectCounter, Figures, adjustment, wait_for
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.processes import settings_env

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

TOPIC = EffectCounter.TOPIC
EVENTS = 1_200
SEND_S = 22.0  # the load lasts about as long as the storm
STEP_S = 2.0  # one membership change this often

MEMBER_SCRIPT = """
import asyncio
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_devkit.testing.chaos import EffectCounter

async def main():
    counter = await EffectCounter(ServiceRuntime(ServiceSettings()), delay_s=0.005).start()
    while True:  # how many it has handled so far: the test kills it once it is busy
        print(sum(counter.calls.values()), flush=True)
        await asyncio.sleep(0.05)

asyncio.run(main())
"""

# What happens at each step: start or stop (gracefully) an in-process member by name, spawn
# a member process or kill one -9. The group never stays empty for long, and sometimes it has
# four members for six partitions.
STORM = [
    ("start", "b"),
    ("spawn", "k1"),
    ("start", "c"),
    ("stop", "a"),
    ("kill", "k1"),
    ("start", "d"),
    ("spawn", "k2"),
    ("stop", "b"),
    ("stop", "c"),
    ("kill", "k2"),
    ("start", "e"),
    ("stop", "d"),
]


class MemberProcess:
    """A group member in a process of its own, which reports how many it has handled."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.handled = 0
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.handled = int(line)

    async def kill_when_busy(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Once it has handled messages, kill it -9; returns how many it had handled."""
        await wait_for(self._busy, timeout=timeout, every=0.05)
        self.proc.send_signal(signal.SIGKILL)  # mid-work: no drain, no commit, no leave
        await self.proc.wait()
        await self._reading
        return self.handled

    async def _busy(self) -> bool:
        assert self.proc.returncode is None, f"member exited with code {self.proc.returncode}"
        return self.handled > 0

    async def close(self) -> None:
        """Kill it if it still runs (cleanup)."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reading.cancel()


async def test_rebalance_storm_applies_every_event_once(omni_env, monkeypatch) -> None:
    figures = Figures("rebalance storm")
    assignments = 0
    assigned = RebalanceListener.on_partitions_assigned

    async def counting(self, partitions) -> None:  # type: ignore[no-untyped-def]
        nonlocal assignments
        assignments += 1
        await assigned(self, partitions)

    # Observation only: counts the assignments the in-process members receive.
    monkeypatch.setattr(RebalanceListener, "on_partitions_assigned", counting)
    settings = omni_env.settings("chaos")
    env = os.environ | settings_env(settings)

    def member() -> EffectCounter:
        return EffectCounter(ServiceRuntime(settings), delay_s=0.005)

    members = {"a": await member().start()}
    every_member = list(members.values())
    processes: dict[str, MemberProcess] = {}
    handled_when_killed: list[int] = []
    timeline: list[str] = []
    changes = {"joined": 1, "left": 0, "killed": 0}
    events = [adjustment(f"SKU-{i % 24}") for i in range(EVENTS)]
    dlq = omni_env.reader(f"{TOPIC}.dlq")
    try:
        async with ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel, dlq:

            async def send() -> None:
                pause = SEND_S / len(events)
                for event in events:
                    await channel.publish(event)
                    await asyncio.sleep(pause)

            started = time.monotonic()
            sending = asyncio.create_task(send())
            for action, name in STORM:
                await asyncio.sleep(STEP_S)
                if action == "start":
                    members[name] = await member().start()
                    every_member.append(members[name])
                    changes["joined"] += 1
                elif action == "stop":
                    await members.pop(name).runtime.stop()
                    changes["left"] += 1
                elif action == "spawn":
                    processes[name] = MemberProcess(
                        await asyncio.create_subprocess_exec(
                            sys.executable, "-c", MEMBER_SCRIPT, env=env, stdout=PIPE
                        )
                    )
                    changes["joined"] += 1
                else:
                    handled_when_killed.append(await processes[name].kill_when_busy())
                    del processes[name]
                    changes["killed"] += 1
                timeline.append(f"{time.monotonic() - started:.1f}s {action} {name}")
            storm_s = time.monotonic() - started
            print("[chaos] rebalance storm timeline:", ", ".join(timeline))
            await sending
            figures.sent = len(events)
            last = members["e"]

            async def all_applied() -> bool:
                return (await last.effects())[0] >= len(events)

            stormed_at = time.monotonic()
            await wait_for(all_applied, timeout=40)
            figures.recovered_s = time.monotonic() - stormed_at
            figures.applied, figures.duplicates = await last.effects()

            async def all_published() -> bool:
                return not await last.runtime.pool.fetchval(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                )

            await wait_for(all_published, timeout=30)
            dead = await dlq.collect(len(events), timeout=1)
            figures.dead_lettered = len(dead)
            # Handler calls of the in-process members: above "applied" by the redeliveries
            # that the inbox absorbed (the killed processes' calls are not counted).
            calls = sum(sum(m.calls.values()) for m in every_member)
            figures.extra.update(
                changes,
                storm_s=round(storm_s, 1),
                assignments_in_process=assignments,
                handler_calls_in_process=calls,
                handled_by_killed=handled_when_killed,
            )
            figures.report()
            assert figures.applied == figures.sent
            assert figures.duplicates == 0
            assert figures.dead_lettered == 0, [record_headers(r)["dlq_error"] for r in dead]
            # Each join and leave rebalanced the group: the members saw it.
            assert assignments >= changes["joined"]
            assert all(handled_when_killed), "a member process was killed before it worked"
    finally:
        for proc in processes.values():
            await proc.close()
        for counter in members.values():
            await counter.runtime.stop()
