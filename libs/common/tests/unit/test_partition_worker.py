"""Wiring of the partition worker: pause when full, resume at half, never block the caller."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from omni_common.kafka import OffsetCommitter, PartitionWorker
from omni_common.metrics import PlatformMetrics
from omni_common.settings import ServiceSettings


class FakeConsumer:
    """Records pause/resume calls (the broker side is covered by integration tests)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self, *tps: TopicPartition) -> None:
        self.calls.append("pause")

    def resume(self, *tps: TopicPartition) -> None:
        self.calls.append("resume")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.calls.append(f"seek {offset}")


class FakeRuntime:
    def __init__(self) -> None:
        self.settings = ServiceSettings(handler_backoff_max_s=0.01)
        self.metrics = PlatformMetrics("unit")
        self.committer = OffsetCommitter(60)
        self.release = asyncio.Event()
        self.handled: list[int] = []

    def parse(self, *_: Any) -> None:
        return None  # every record goes through consume_record, one at a time

    async def consume_record(self, record: Any, *_: Any) -> None:
        await self.release.wait()
        self.handled.append(record.offset)


def message(offset: int) -> Any:
    record = ConsumerRecord("t", 0, offset, 0, 0, None, b"{}", None, 2, 0, [])
    return SimpleNamespace(raw_message=record)


async def test_a_full_queue_pauses_its_partition_and_a_drained_one_resumes_it() -> None:
    runtime, consumer = FakeRuntime(), FakeConsumer()
    worker = PartitionWorker(
        runtime,  # type: ignore[arg-type]
        consumer,
        TopicPartition("t", 0),
        {"t": ("t", "c", {})},
        queue_size=4,
    )
    try:
        for offset in range(10):
            worker.offer(message(offset))  # never waits, even past the bound
        assert consumer.calls == ["pause"]
        runtime.release.set()
        for _ in range(100):
            if len(runtime.handled) == 10:
                break
            await asyncio.sleep(0.01)
        assert runtime.handled == list(range(10))
        assert consumer.calls == ["pause", "resume"]
        assert runtime.committer._pending[consumer] == {TopicPartition("t", 0): 10}
    finally:
        await worker.stop(grace_s=0.1)
