"""One partition's records, handled one lot after the other: per-key order, never a stall.

Partitions are handled concurrently: an event waiting on the database holds up only its
own partition. The fetch loop never waits on a worker: a partition with ``queue_size``
records waiting is paused alone at the consumer, and resumed once its queue has drained to
half. A worker about to handle its events also takes those waiting in idle partitions of
the same topic (its neighbours): one transaction for all of them, so the busier the
service, the larger its lots and the cheaper each event. If a record can be neither
handled nor dead-lettered, the worker drops what it has queued and rewinds the partition
to that record, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from contextvars import Context
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError

from omni_common.dispatch import Dispatcher, Entry, Invalid, Route, Skip, Valid
from omni_common.offsets import OffsetCommitter

log = logging.getLogger(__name__)


class State(enum.Enum):
    """What a partition worker is doing."""

    IDLE = "idle"
    """Waiting for records (it may lend what it has to a neighbour's lot)."""
    HANDLING = "handling"
    """Handling records of its own (and maybe some borrowed from neighbours)."""
    LENT = "lent"
    """Its leading records are in a neighbour's lot: it waits until they are given back."""
    STOPPED = "stopped"
    """Its partition was revoked or the service stops: it handles nothing more."""


class PartitionWorker:
    """Handles one partition's records in order (see the module's docstring)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        committer: OffsetCommitter,
        consumer: Any,
        tp: TopicPartition,
        route: Route,
        *,
        queue_size: int,
        lot_size: int,
        neighbours: list[PartitionWorker],
    ) -> None:
        self.dispatcher = dispatcher
        self.committer = committer
        self.consumer = consumer
        self.tp = tp
        self.route = route
        self.queue_size = queue_size
        self.lot_size = lot_size
        # Unbounded on purpose: the bound is kept by pausing the partition, never by making
        # the shared fetch loop wait.
        self.queue: collections.deque[Entry] = collections.deque()
        self.state = State.IDLE
        # Flow control at the consumer, apart from the state: a paused partition fetches
        # nothing more until its queue has drained to half.
        self.paused = False
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()  # neither handling nor lent
        self._settled.set()
        # Set by stop(): the lot in hand is finished, no other one starts (one starting in
        # the same step as the last one ends would be cancelled half-way, handled again by
        # the next owner).
        self._draining = False
        self.neighbours = neighbours
        neighbours.append(self)
        m = dispatcher.metrics
        self._handling_seconds = m.event_handling.labels(m.service, route.topic)
        self._rewinds = m.consumer_rewinds.labels(m.service, route.topic)
        self._pauses = m.partitions_paused.labels(m.service, tp.topic)
        # A fresh context: the worker must not inherit the first record's trace.
        self.task = asyncio.create_task(
            self._run(), name=f"partition-worker-{tp.topic}-{tp.partition}", context=Context()
        )

    # -- intake (the fetch loop; never awaits) ---------------------------------------------

    def offer(self, record: ConsumerRecord[Any, Any]) -> None:
        """Take a fetched record; pause the partition when its queue is full."""
        entry = self.dispatcher.classify(record, self.route)
        if isinstance(entry.verdict, Skip):
            self.dispatcher.count(self.route.topic, entry.verdict.ce_type, entry.verdict.outcome)
            if not self.queue and self.state is State.IDLE:
                self.committer.handled(self.consumer, record)  # nothing before it is pending
                return
        self.queue.append(entry)
        self._wake.set()
        if not self.paused and len(self.queue) >= self.queue_size:
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                self.consumer.pause(self.tp)
                self.paused = True
                self._pauses.inc()

    def _maybe_resume(self) -> None:
        if self.paused and len(self.queue) <= self.queue_size // 2:
            self.paused = False
            with contextlib.suppress(IllegalStateError):
                self.consumer.resume(self.tp)

    def _become(self, state: State) -> None:
        self.state = state
        if state in (State.HANDLING, State.LENT):
            self._settled.clear()
        else:
            self._settled.set()

    # -- handling --------------------------------------------------------------------------

    async def _run(self) -> None:
        while self.state is not State.STOPPED:
            if not self.queue or self.state is State.LENT or self._draining:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._become(State.HANDLING)
            try:
                await self._handle(self._take())
            finally:
                if self.state is State.HANDLING:
                    self._become(State.IDLE)

    def _take(self) -> list[Entry]:
        taken = [self.queue.popleft()]
        while len(taken) < self.lot_size and self.queue:
            taken.append(self.queue.popleft())
        self._maybe_resume()
        return taken

    async def _handle(self, taken: list[Entry]) -> None:
        """In order: stretches that may go together as lots, the others alone."""
        stretch: list[Entry] = []
        for entry in taken:
            if not entry.must_go_alone:
                stretch.append(entry)
                continue
            if not await self._stretch(stretch):
                return
            stretch = []
            if not await self._alone(entry):
                return
            self.committer.handled(self.consumer, entry.record)
        await self._stretch(stretch)

    async def _stretch(self, stretch: list[Entry]) -> bool:
        """Valid events as one lot (with what idle neighbours have waiting), invalid ones to
        the DLQ, skipped ones acknowledged; False after a rewind."""
        if not stretch:
            return True
        valid = [e for e in stretch if isinstance(e.verdict, Valid)]
        started = time.perf_counter()
        together = False
        failed: Exception | None = None
        if valid:
            # Even one event goes as a lot: its inbox record is written with what it emits,
            # in one statement, instead of asked for first (a redelivery is rare; it rolls
            # back and comes again alone, where the inbox is asked first).
            lenders = self._borrow(self.lot_size - len(valid))
            try:
                sources = [valid] + [
                    [e for e in taken if isinstance(e.verdict, Valid)] for _, taken in lenders
                ]
                failed = await self.dispatcher.handle_lot(sources)
                together = failed is None
            finally:
                for lender, taken in lenders:
                    lender._give_back(taken, handled=together)
            if sum(map(len, sources)) > 1:
                failed = None  # whose failure it was is not known: each starts afresh
        for entry in stretch:
            if isinstance(entry.verdict, Valid) and not together:
                if not await self._alone(entry, failed):
                    return False
            elif isinstance(entry.verdict, Invalid):
                try:
                    await self.dispatcher.dead_letter(entry)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._rewind(entry)
                    await asyncio.sleep(self.dispatcher.settings.handler_backoff_max_s)
                    return False
        if valid:
            self._handling_seconds.observe(time.perf_counter() - started)
        self.committer.handled(self.consumer, stretch[-1].record)
        return True

    async def _alone(self, entry: Entry, failed: Exception | None = None) -> bool:
        """One valid event with its own retries and DLQ (``failed``: how its first attempt
        failed); False after a rewind to it."""
        started = time.perf_counter()
        try:
            await self.dispatcher.handle_alone(entry, failed)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._rewind(entry)
            await asyncio.sleep(self.dispatcher.settings.handler_backoff_max_s)
            return False
        self._handling_seconds.observe(time.perf_counter() - started)
        return True

    def _rewind(self, entry: Entry) -> None:
        """Drop what is queued and fetch again from ``entry`` (it could not even be
        dead-lettered). The consumer hands records over without awaiting, and discards
        what it fetched before a seek, so nothing stale can arrive after this."""
        r = entry.record
        log.exception(
            "could not handle or dead-letter %s[%d]@%d; rewinding", r.topic, r.partition, r.offset
        )
        self._rewinds.inc()
        self.queue.clear()
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile: the new owner has it
            self.consumer.seek(self.tp, r.offset)
        self._maybe_resume()

    # -- lending ---------------------------------------------------------------------------

    def _borrow(self, room: int) -> list[tuple[PartitionWorker, list[Entry]]]:
        """Take the events idle neighbours have waiting that may join a lot, up to ``room``.

        No await in here: a neighbour seen idle stays idle until it is marked lent.
        """
        lenders: list[tuple[PartitionWorker, list[Entry]]] = []
        for other in self.neighbours:
            if room <= 0:
                break
            if other is self or other.state is not State.IDLE or not other.queue:
                continue
            n = 0
            has_valid = False
            for entry in other.queue:
                if n >= room or entry.must_go_alone or isinstance(entry.verdict, Invalid):
                    break
                has_valid = has_valid or isinstance(entry.verdict, Valid)
                n += 1
            if not has_valid:
                continue  # its own worker acknowledges it
            taken = [other.queue.popleft() for _ in range(n)]
            other._become(State.LENT)
            other._maybe_resume()
            lenders.append((other, taken))
            room -= n
        return lenders

    def _give_back(self, taken: list[Entry], *, handled: bool) -> None:
        if handled:
            self.committer.handled(self.consumer, taken[-1].record)
        else:  # back to the front of its own queue, each valid event to be handled alone
            for entry in reversed(taken):
                entry.alone = True
                self.queue.appendleft(entry)
        if self.state is State.LENT:
            self._become(State.IDLE)
        self._wake.set()

    # -- stopping --------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """Finish the records in hand, its own or lent (up to ``grace_s``); what is queued
        comes again to the partition's next owner."""
        with contextlib.suppress(ValueError):
            self.neighbours.remove(self)
        self._draining = True
        if not self._settled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), grace_s)
        self._become(State.STOPPED)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.queue.clear()
