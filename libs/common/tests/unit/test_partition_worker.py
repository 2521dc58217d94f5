"""Wiring of the partition worker: pause when full, resume at half, never block the caller;
lots across idle neighbours; failed lots given back to be handled alone, in order; records
nobody wants acknowledged without splitting a lot."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError
from omni_common.dispatch import Entry, Invalid, Route, Skip, Valid
from omni_common.metrics import PlatformMetrics
from omni_common.offsets import OffsetCommitter
from omni_common.settings import ServiceSettings
from omni_common.worker import PartitionWorker
from opentelemetry.context import Context

ROUTE = Route(topic="t", handlings={}, known_types=frozenset())


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

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", p) for p in range(8)}


class FakeDispatcher:
    """Classifies by the record's value (``b"valid"``, ``b"alone"``, ``b"skip"``, ``b"bad"``)
    and records what it was asked to handle; lots fail while ``lots_fail``."""

    def __init__(self) -> None:
        self.settings = ServiceSettings(handler_backoff_max_s=0.01)
        self.metrics = PlatformMetrics("unit")
        self.release = asyncio.Event()
        self.release.set()
        self.lots: list[list[tuple[int, int]]] = []
        self.alone: list[tuple[int, int]] = []
        self.dead: list[tuple[int, int]] = []
        self.order: list[tuple[str, int]] = []
        self.lots_fail = False

    def classify(self, record: Any, route: Route) -> Entry:
        value = record.value
        if value == b"skip":
            verdict: Any = Skip("x", "ignored")
        elif value == b"bad":
            verdict = Invalid("malformed_json", "not JSON", "x")
        else:
            verdict = Valid(None, None, None, value != b"alone", Context())  # type: ignore[arg-type]
        return Entry(record, route, verdict)

    def count(self, *_: Any) -> None:
        pass

    async def handle_lot(self, sources: list[list[Entry]]) -> Exception | None:
        await asyncio.sleep(0)
        if self.lots_fail:
            return RuntimeError("the lot rolled back")
        lot = [(e.record.partition, e.record.offset) for source in sources for e in source]
        self.lots.append(lot)
        self.order.extend(("lot", o) for _, o in lot)
        return None

    async def handle_alone(self, entry: Entry, failed: Exception | None = None) -> None:
        await self.release.wait()
        self.alone.append((entry.record.partition, entry.record.offset))
        self.order.append(("alone", entry.record.offset))

    async def dead_letter(self, entry: Entry, invalid: Any = None) -> None:
        self.dead.append((entry.record.partition, entry.record.offset))


def record_at(partition: int, offset: int, value: bytes = b"valid") -> Any:
    return ConsumerRecord("t", partition, offset, 0, 0, None, value, None, 2, 0, [])


def workers(
    dispatcher: FakeDispatcher,
    consumer: FakeConsumer,
    partitions: int,
    queue_size: int = 100,
    committer: OffsetCommitter | None = None,
) -> tuple[list[PartitionWorker], list[PartitionWorker], OffsetCommitter]:
    """Workers of ``partitions`` partitions of topic ``t``, neighbours of each other."""
    committer = committer or OffsetCommitter(60)
    neighbours: list[PartitionWorker] = []
    made = [
        PartitionWorker(
            dispatcher,  # type: ignore[arg-type]
            committer,
            consumer,
            TopicPartition("t", p),
            ROUTE,
            queue_size=queue_size,
            lot_size=64,
            neighbours=neighbours,
        )
        for p in range(partitions)
    ]
    return made, neighbours, committer


async def settle(dispatcher: FakeDispatcher, events: int) -> None:
    for _ in range(400):
        done = sum(map(len, dispatcher.lots)) + len(dispatcher.alone) + len(dispatcher.dead)
        if done >= events:
            return
        await asyncio.sleep(0.005)


async def test_a_full_queue_pauses_its_partition_and_a_drained_one_resumes_it() -> None:
    dispatcher, consumer = FakeDispatcher(), FakeConsumer()
    dispatcher.release.clear()
    (worker,), _, committer = workers(dispatcher, consumer, 1, queue_size=4)
    try:
        for offset in range(10):
            worker.offer(record_at(0, offset, b"alone"))  # never waits, even past the bound
        assert consumer.calls == ["pause"]
        dispatcher.release.set()
        await settle(dispatcher, 10)
        assert [o for _, o in dispatcher.alone] == list(range(10))
        assert consumer.calls == ["pause", "resume"]
        assert committer._pending[consumer] == {TopicPartition("t", 0): 10}
    finally:
        await worker.stop(grace_s=0.1)


async def test_a_worker_takes_the_events_waiting_in_idle_neighbours_into_its_lot() -> None:
    dispatcher, consumer = FakeDispatcher(), FakeConsumer()
    made, neighbours, committer = workers(dispatcher, consumer, 3)
    try:
        for offset in range(4):
            for p in range(3):
                made[p].offer(record_at(p, offset))
        await settle(dispatcher, 12)
        # One transaction for the three partitions, each in its own order.
        assert len(dispatcher.lots) == 1
        lot = dispatcher.lots[0]
        assert sorted(lot) == [(p, o) for p in range(3) for o in range(4)]
        for p in range(3):
            assert [o for q, o in lot if q == p] == [0, 1, 2, 3]
        assert committer._pending[consumer] == {TopicPartition("t", p): 4 for p in range(3)}
    finally:
        for worker in made:
            await worker.stop(grace_s=0.1)
    assert neighbours == []


async def test_a_lot_that_rolls_back_gives_each_partition_its_events_back_to_handle_alone() -> None:
    dispatcher, consumer = FakeDispatcher(), FakeConsumer()
    dispatcher.lots_fail = True
    made, _, committer = workers(dispatcher, consumer, 2)
    try:
        for offset in range(3):
            for p in range(2):
                made[p].offer(record_at(p, offset))
        await settle(dispatcher, 6)
        assert dispatcher.lots == []
        for p in range(2):
            assert [o for q, o in dispatcher.alone if q == p] == [0, 1, 2]
        assert committer._pending[consumer] == {TopicPartition("t", p): 3 for p in range(2)}
    finally:
        for worker in made:
            await worker.stop(grace_s=0.1)


async def test_an_event_that_may_not_join_a_lot_is_handled_alone_in_its_order() -> None:
    dispatcher, consumer = FakeDispatcher(), FakeConsumer()
    (worker,), _, _ = workers(dispatcher, consumer, 1)
    try:
        for offset in range(5):
            worker.offer(record_at(0, offset, b"alone" if offset == 2 else b"valid"))
        await settle(dispatcher, 5)
        assert dispatcher.order == [("lot", 0), ("lot", 1), ("alone", 2), ("lot", 3), ("lot", 4)]
    finally:
        await worker.stop(grace_s=0.1)


async def test_records_nobody_wants_or_that_are_invalid_do_not_split_a_lot() -> None:
    dispatcher, consumer = FakeDispatcher(), FakeConsumer()
    (worker,), _, committer = workers(dispatcher, consumer, 1)
    values = [b"valid", b"skip", b"bad", b"valid", b"skip", b"valid"]
    try:
        for offset, value in enumerate(values):
            worker.offer(record_at(0, offset, value))
        await settle(dispatcher, 4)
        assert dispatcher.lots == [[(0, 0), (0, 3), (0, 5)]]
        assert dispatcher.dead == [(0, 2)]
        assert committer._pending[consumer] == {TopicPartition("t", 0): 6}
    finally:
        await worker.stop(grace_s=0.1)


async def test_a_record_nobody_wants_on_an_idle_partition_is_acknowledged_at_once() -> None:
    dispatcher, consumer = FakeDispatcher(), FakeConsumer()
    (worker,), _, committer = workers(dispatcher, consumer, 1)
    try:
        worker.offer(record_at(0, 7, b"skip"))
        # No queue, no wake-up of the worker: the offset is done when it is offered.
        assert not worker.queue
        assert committer._pending[consumer] == {TopicPartition("t", 0): 8}
    finally:
        await worker.stop(grace_s=0.1)


class Revoking(FakeConsumer):
    """A consumer that has just lost partition 1 to another member."""

    def __init__(self) -> None:
        super().__init__()
        self.committed: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", 0)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if set(offsets) - self.assignment():  # as aiokafka refuses it
            raise IllegalStateError("partition is not assigned")
        self.committed.append(dict(offsets))


async def test_a_late_offset_of_a_revoked_partition_does_not_take_the_others_down() -> None:
    """A lot that finished after its partition was revoked notes an offset the consumer no
    longer owns. On the old code the commit failed as a whole, and the offsets of the
    partitions still owned were dropped with it."""
    committer, consumer = OffsetCommitter(60), Revoking()
    committer.handled(consumer, record_at(0, 41))
    committer.handled(consumer, record_at(1, 9))  # revoked meanwhile
    await committer.flush()
    assert consumer.committed == [{TopicPartition("t", 0): 42}]


class Gated(FakeDispatcher):
    """Lots start, then wait at the gate; every lot that started is remembered."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.started: list[int] = []

    async def handle_lot(self, sources: list[list[Entry]]) -> Exception | None:
        self.started.append(sum(map(len, sources)))
        await self.gate.wait()
        return await super().handle_lot(sources)


async def test_a_stopping_worker_finishes_the_lot_in_hand_and_starts_no_other() -> None:
    """A lot started in the same step as the last one ended would be cancelled half-way by
    the stop: its events' handler would have run, and the next owner would run it again."""
    dispatcher, consumer = Gated(), FakeConsumer()
    (worker,), _, committer = workers(dispatcher, consumer, 1)
    for offset in range(74):
        worker.offer(record_at(0, offset))
    for _ in range(100):
        if dispatcher.started:
            break
        await asyncio.sleep(0.001)
    stopping = asyncio.create_task(worker.stop(grace_s=5))
    await asyncio.sleep(0.01)
    dispatcher.gate.set()
    await stopping
    assert dispatcher.started == [64]
    assert [len(lot) for lot in dispatcher.lots] == [64]
    assert committer._pending[consumer] == {TopicPartition("t", 0): 64}
