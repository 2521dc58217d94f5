"""Committing consumed offsets: after the effect is durable, in the background, per partition."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

log = logging.getLogger(__name__)


class OffsetCommitter:
    """Commits the offsets of handled messages, per partition, in the background.

    Committing after every message costs a broker round trip per message. Handled offsets
    are instead committed every ``interval_s``: still only after the effect is durable, and
    a crash redelivers at most one interval's worth, which the inbox turns into no-ops.

    Only partitions the consumer still owns are committed: an offset noted for a partition
    revoked meanwhile (a lot that finished late) is dropped alone, never taking the other
    partitions' offsets down with it.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._pending: dict[Any, dict[TopicPartition, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._has_pending = asyncio.Event()

    def handled(self, consumer: Any, record: ConsumerRecord[Any, Any]) -> None:
        """Note that ``record`` (and everything before it in its partition) is done."""
        offsets = self._pending.setdefault(consumer, {})
        offsets[TopicPartition(record.topic, record.partition)] = record.offset + 1
        self._has_pending.set()

    async def flush(
        self, only_consumer: Any = None, only: set[TopicPartition] | None = None
    ) -> None:
        """Commit everything handled so far (or only ``only`` partitions of one consumer)."""
        if only_consumer is None:
            pending, self._pending = self._pending, {}
        else:
            mine = self._pending.get(only_consumer, {})
            taken = {tp: o for tp, o in mine.items() if only is None or tp in only}
            for tp in taken:
                del mine[tp]
            if not mine:
                self._pending.pop(only_consumer, None)
            pending = {only_consumer: taken} if taken else {}
        for consumer, offsets in pending.items():
            await self._commit(consumer, offsets)

    async def _commit(self, consumer: Any, offsets: dict[TopicPartition, int]) -> None:
        try:
            owned = consumer.assignment()
        except IllegalStateError:
            owned = set()
        gone = {tp for tp in offsets if tp not in owned}
        if gone:
            # Revoked since: the new owner resumes from the last commit; the inbox absorbs it.
            log.info("offsets of revoked partitions not committed: %s", sorted(gone))
        offsets = {tp: o for tp, o in offsets.items() if tp not in gone}
        if not offsets:
            return  # aiokafka refuses an empty commit
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError):
            # The group rebalanced under the commit: what is still ours is tried again.
            log.info("offset commit interrupted by a rebalance; will retry what is still owned")
            self._retry(consumer, offsets)
        except KafkaError:
            log.warning("offset commit failed; will retry", exc_info=True)
            self._retry(consumer, offsets)

    def _retry(self, consumer: Any, offsets: dict[TopicPartition, int]) -> None:
        again = self._pending.setdefault(consumer, {})
        for tp, offset in offsets.items():
            again[tp] = max(offset, again.get(tp, 0))

    def forget(self, consumer: Any, partitions: set[TopicPartition]) -> None:
        """Drop what is pending for ``partitions`` (handed to another member)."""
        mine = self._pending.get(consumer)
        if mine:
            for tp in partitions:
                mine.pop(tp, None)

    def start(self) -> None:
        """Commit periodically in the background."""
        self._task = asyncio.create_task(self._run(), name="offset-committer")

    async def stop(self) -> None:
        """Stop the background commits and commit what is left."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await self._has_pending.wait()  # idle: no wake-ups
            await asyncio.sleep(self.interval_s)
            self._has_pending.clear()
            await self.flush()
            if self._pending and any(self._pending.values()):  # a failed commit put some back
                self._has_pending.set()
