"""Wiring of the partition worker: pause when full, resume at half, never block the caller."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from omni_common.kafka import OffsetCommitter, PartitionWorker
from omni_common.metrics import PlatformMetrics
from omni_common.settings import ServiceSettings
from opentelemetry.context import Context


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
    return ConsumerRecord("t", 0, offset, 0, 0, None, b"{}", None, 2, 0, [])


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
            worker.offer(message(offset), Context())  # never waits, even past the bound
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


class LotRuntime(FakeRuntime):
    """Every record is a valid event; lots are recorded, and fail while ``lots_fail``."""

    def __init__(self) -> None:
        super().__init__()
        self.lots: list[list[tuple[int, int]]] = []
        self.alone: list[tuple[int, int]] = []
        self.lots_fail = False

    def parse(self, record: Any, *_: Any) -> Any:
        return SimpleNamespace(record=record, trace_context=None, together=True)

    def can_handle_together(self) -> bool:
        return True

    async def handle_together(self, lot: list[Any]) -> bool:
        await asyncio.sleep(0)
        if self.lots_fail:
            return False
        self.lots.append([(p.record.partition, p.record.offset) for p in lot])
        return True

    async def handle_parsed(self, parsed: Any) -> None:
        self.alone.append((parsed.record.partition, parsed.record.offset))


def record_at(partition: int, offset: int) -> Any:
    return ConsumerRecord("t", partition, offset, 0, 0, None, b"{}", None, 2, 0, [])


async def _settle(runtime: LotRuntime, events: int) -> None:
    for _ in range(200):
        if sum(map(len, runtime.lots)) + len(runtime.alone) >= events:
            return
        await asyncio.sleep(0.005)


def _neighbours(
    runtime: LotRuntime, consumer: FakeConsumer, partitions: int
) -> tuple[list[PartitionWorker], list[PartitionWorker]]:
    """Workers of ``partitions`` partitions of topic ``t``, neighbours of each other."""
    neighbours: list[PartitionWorker] = []
    workers = [
        PartitionWorker(
            runtime,  # type: ignore[arg-type]
            consumer,
            TopicPartition("t", p),
            {"t": ("t", "c", {})},
            queue_size=100,
            neighbours=neighbours,
        )
        for p in range(partitions)
    ]
    return workers, neighbours


async def test_a_worker_takes_the_events_waiting_in_idle_neighbours_into_its_lot() -> None:
    runtime, consumer = LotRuntime(), FakeConsumer()
    workers, neighbours = _neighbours(runtime, consumer, 3)
    try:
        for offset in range(4):
            for p in range(3):
                workers[p].offer(record_at(p, offset), Context())
        await _settle(runtime, 12)
        # One transaction for the three partitions, each in its own order.
        assert len(runtime.lots) == 1
        lot = runtime.lots[0]
        assert sorted(lot) == [(p, o) for p in range(3) for o in range(4)]
        for p in range(3):
            assert [o for q, o in lot if q == p] == [0, 1, 2, 3]
        assert runtime.committer._pending[consumer] == {TopicPartition("t", p): 4 for p in range(3)}
    finally:
        for worker in workers:
            await worker.stop(grace_s=0.1)
    assert neighbours == []


async def test_a_lot_that_rolls_back_gives_each_partition_its_events_back_to_handle_alone() -> None:
    runtime, consumer = LotRuntime(), FakeConsumer()
    runtime.lots_fail = True
    workers, _ = _neighbours(runtime, consumer, 2)
    try:
        for offset in range(3):
            for p in range(2):
                workers[p].offer(record_at(p, offset), Context())
        await _settle(runtime, 6)
        assert runtime.lots == []
        for p in range(2):
            assert [o for q, o in runtime.alone if q == p] == [0, 1, 2]
        assert runtime.committer._pending[consumer] == {TopicPartition("t", p): 3 for p in range(2)}
    finally:
        for worker in workers:
            await worker.stop(grace_s=0.1)


async def test_an_event_that_may_not_join_a_lot_is_handled_alone_in_its_order() -> None:
    runtime, consumer = LotRuntime(), FakeConsumer()
    order: list[tuple[str, int]] = []
    runtime.parse = lambda record, *_: SimpleNamespace(  # type: ignore[method-assign]
        record=record, trace_context=None, together=record.offset != 2
    )
    together = runtime.handle_together
    alone = runtime.handle_parsed

    async def lot(parsed: list[Any]) -> bool:
        order.extend(("lot", p.record.offset) for p in parsed)
        return await together(parsed)

    async def single(parsed: Any) -> None:
        order.append(("alone", parsed.record.offset))
        await alone(parsed)

    runtime.handle_together = lot  # type: ignore[method-assign]
    runtime.handle_parsed = single  # type: ignore[method-assign]
    worker = PartitionWorker(
        runtime,  # type: ignore[arg-type]
        consumer,
        TopicPartition("t", 0),
        {"t": ("t", "c", {})},
        queue_size=100,
    )
    try:
        for offset in range(5):
            worker.offer(record_at(0, offset), Context())
        await _settle(runtime, 5)
        assert order == [("lot", 0), ("lot", 1), ("alone", 2), ("lot", 3), ("lot", 4)]
    finally:
        await worker.stop(grace_s=0.1)
