"""From a fetched record to a committed effect: look, validate once, handle, dead-letter.

Every record is looked at once, when it is fetched (:meth:`Dispatcher.classify`):

- its ``ce_type`` header first: an event of the topic's contract that no handler of this
  service wants is acknowledged there and then, without decoding, a span or a transaction;
- then its envelope and payload, which give the event or the reason it is invalid (the
  reason the DLQ entry carries: nothing is parsed twice);
- then the handler's ``only_when`` filter, before any transaction opens.

Valid events are handled in lots (:meth:`Dispatcher.handle_lot`): one transaction, each
handler called once with the lot's events of its types, in order. If anything fails the
lot rolls back and each event is handled alone (:meth:`Dispatcher.handle_alone`) with its
own retries: a failure while the database does not answer waits, with capped backoff,
until it does (nothing valid is dead-lettered by an outage); lost races are retried until
they win; a :class:`~omni_common.handlers.Refusal` is dead-lettered at once with its
reason; anything else is retried a bounded number of times, then dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from aiokafka import ConsumerRecord
from omni_contracts.base import Event
from omni_contracts.envelope import Envelope, EnvelopeError, PayloadError, decode, parse_envelope
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from omni_common.faults import Backoff, is_contention, is_infrastructure_error, wait_until_healthy
from omni_common.handlers import BoundHandler, Received, Refusal
from omni_common.logging import redact
from omni_common.metrics import PlatformMetrics
from omni_common.settings import ServiceSettings
from omni_common.telemetry import spans_wanted, trace_headers

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("omni_common.kafka")

UNSTORABLE: tuple[type[Exception], ...] = (
    asyncpg.DataError,  # SQLSTATE class 22: out of range, NUL in text, too long, ...
    asyncpg.exceptions._base.DataError,  # asyncpg refused to encode an argument
    asyncpg.CheckViolationError,
)
"""Database errors that say the value itself is wrong (HTTP answers them 422)."""


class HandledBefore(Exception):
    """Some events of a lot were already in the inbox (a redelivery).

    The lot rolls back and its events are handled one by one, where each duplicate is
    recognised before its effect.
    """


class InvalidOutgoingEvent(Exception):
    """A handler emitted an event its own model refuses: our bug, not the incoming event's.

    The incoming event is dead-lettered (``invalid_output``, the handler named), so it can
    be replayed once the handler is mended.
    """


@dataclass(frozen=True, slots=True)
class Handling:
    """The handler of one event type on one topic."""

    model: type[Event]
    handler: BoundHandler
    name: str
    relevant: Callable[[Any], bool] | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """What this service does with one topic's records."""

    topic: str
    """The contract topic name (unprefixed)."""
    handlings: Mapping[str, Handling]
    """``ce_type`` -> its handler."""
    known_types: frozenset[str]
    """The event types the contract puts on this topic (the others are unknown)."""
    joins_lot: Callable[[Event], bool] | None = None
    """Which events may be handled in a lot (None: all)."""
    prepare: BoundHandler | None = None


Trace = otel_context.Context | dict[str, str]
"""Where an event's handling continues its journey's trace: the context of its consumer
span, or (no span wanted) the trace headers it came with, passed on unchanged. (A Context is
a dict too: tell them apart by the Context.)"""


@dataclass(slots=True)
class Valid:
    """A record holding an event a handler wants."""

    event: Event
    envelope: Envelope
    handling: Handling
    joins_lot: bool
    trace: Trace


@dataclass(frozen=True, slots=True)
class Invalid:
    """A record to dead-letter, and why."""

    reason: str
    error: str
    ce_type: str


@dataclass(frozen=True, slots=True)
class Skip:
    """A record acknowledged without handling: a tombstone, an unwanted or irrelevant event."""

    ce_type: str
    outcome: str


Verdict = Valid | Invalid | Skip


@dataclass(slots=True)
class Entry:
    """A fetched record, what it holds, and whether it must be handled alone."""

    record: ConsumerRecord[Any, Any]
    route: Route
    verdict: Verdict
    # Put back after a lot it was in rolled back: handled alone from now on, so a failure
    # stays with its own event.
    alone: bool = False

    @property
    def must_go_alone(self) -> bool:
        """A valid event that may not join a lot (any more)."""
        v = self.verdict
        return isinstance(v, Valid) and (self.alone or not v.joins_lot)


class Transactions(Protocol):
    """What the dispatcher needs of the service: transactions with the inbox, a health probe."""

    def handling(
        self, events: Sequence[Valid], *, check_first: bool
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """A transaction for ``events``; yields None when ``check_first`` finds it handled."""
        ...

    async def database_problem(self) -> str | None:
        """None when the database answers, else why not."""
        ...


Send = Callable[[str, bytes, bytes | None, Mapping[str, str]], Awaitable[Awaitable[object]]]
"""``send(topic, value, key, headers)``: the broker acknowledgement to await."""


def ce_type_header(record: ConsumerRecord[Any, Any]) -> str | None:
    """The ``ce_type`` header, read without parsing the rest of the envelope."""
    for key, value in record.headers or ():
        if key == "ce_type":
            if isinstance(value, bytes):
                try:
                    return value.decode()
                except UnicodeDecodeError:
                    return None
            return value if isinstance(value, str) else None
    return None


def record_trace(record: ConsumerRecord[Any, Any]) -> Trace:
    """Where handling ``record`` continues its trace: a consumer span, child of its
    producer's, when spans go anywhere; else just the trace headers it came with."""
    carrier = trace_headers(record.headers or ())
    if not spans_wanted():
        return carrier
    parent = propagate.extract(carrier)
    span = _tracer.start_span(
        f"{record.topic} process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation": "process",
            "messaging.destination.name": record.topic,
            "messaging.kafka.destination.partition": record.partition,
            "messaging.kafka.message.offset": record.offset,
        },
    )
    # Ended at once, like the producer's: it marks the hand-over, and the handling's spans
    # and the events it causes are its children.
    span.end()
    return trace.set_span_in_context(span, parent)


def dlq_headers(
    record: ConsumerRecord[Any, Any], *, reason: str, error: str, service: str
) -> dict[str, str]:
    """The original headers plus the ``dlq_*`` headers the contract names."""
    headers: dict[str, str] = {}
    for key, value in record.headers or ():
        with contextlib.suppress(UnicodeDecodeError):
            headers[key] = value.decode() if isinstance(value, bytes) else str(value)
    headers.update(
        {
            "dlq_reason": reason,
            "dlq_error": redact(error)[:2000],  # a validation error quotes the input
            "dlq_source_topic": record.topic,
            "dlq_source_partition": str(record.partition),
            "dlq_source_offset": str(record.offset),
            "dlq_service": service,
        }
    )
    return headers


def _lot_span(topic: str, events: Sequence[Valid]) -> trace.Span:
    """A span for handling a lot: in the first event's trace, linked to every other's."""
    contexts = [v.trace for v in events if isinstance(v.trace, otel_context.Context)]
    links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in contexts[1:]]
    return _tracer.start_span(
        f"{topic} process lot",
        context=contexts[0] if contexts else None,
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes={"messaging.system": "kafka", "messaging.batch.message_count": len(events)},
    )


def runs_of(sources: Sequence[Sequence[Valid]]) -> list[tuple[Handling, list[Received[Any]]]]:
    """A lot's events as calls: each handler once per stretch of its events.

    ``sources`` are the lot's events per partition, each in its order; events of different
    partitions may be reordered (no order holds between them), events of one may not. So a
    call takes, from every partition, the leading events that go to the same handler.
    """
    pending = [list(source) for source in sources if source]
    calls: list[tuple[Handling, list[Received[Any]]]] = []
    while pending:
        first = pending[0][0].handling
        items: list[Received[Any]] = []
        for queue in pending:
            n = 0
            while n < len(queue) and queue[n].handling.handler is first.handler:
                n += 1
            items.extend(Received(v.event, v.envelope) for v in queue[:n])
            del queue[:n]
        pending = [queue for queue in pending if queue]
        calls.append((first, items))
    return calls


class Dispatcher:
    """Classifies fetched records and handles them: in lots, alone, or into the DLQ."""

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: PlatformMetrics,
        transactions: Transactions,
        send: Send,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.transactions = transactions
        self._send = send
        self._counters: dict[tuple[str, str, str], Any] = {}
        self.refusal_observers: list[Callable[[Refusal], None]] = []
        """Called with each refusal once its event is dead-lettered (business counters)."""

    # -- looking at a record --------------------------------------------------------------

    def classify(self, record: ConsumerRecord[Any, Any], route: Route) -> Entry:
        """The record with what it holds (see the module's docstring)."""
        return Entry(record, route, self._verdict(record, route))

    def _verdict(self, record: ConsumerRecord[Any, Any], route: Route) -> Verdict:
        if record.value is None and record.key is not None:
            # A tombstone on a compacted topic: the key was forgotten, there is no event.
            return Skip("tombstone", "ignored")
        ce_type = ce_type_header(record)
        handling = route.handlings.get(ce_type) if ce_type is not None else None
        if handling is None and ce_type in route.known_types:
            return Skip(ce_type, "ignored")  # a contract event this service does not want
        try:
            envelope = parse_envelope(record.headers or ())
        except EnvelopeError as exc:
            return Invalid("invalid_envelope", str(exc), ce_type or "unknown")
        if handling is None:
            return Invalid(
                "unknown_event_type",
                f"ce_type {envelope.type!r} is not in {route.topic}",
                envelope.type,
            )
        try:
            event = decode(handling.model, record.value)
        except PayloadError as exc:
            reason = "malformed_json" if str(exc).startswith("malformed") else "schema_violation"
            return Invalid(reason, str(exc), envelope.type)
        if handling.relevant is not None and not handling.relevant(event):
            return Skip(envelope.type, "not_relevant")
        joins = route.joins_lot is None or route.joins_lot(event)
        return Valid(event, envelope, handling, joins, record_trace(record))

    def count(self, topic: str, ce_type: str, outcome: str, n: int = 1) -> None:
        """``omni_events_handled_total`` (children cached: counted for every record)."""
        key = (topic, ce_type, outcome)
        counter = self._counters.get(key)
        if counter is None:
            m = self.metrics
            counter = self._counters[key] = m.events_handled.labels(m.service, *key)
        counter.inc(n)

    # -- handling -------------------------------------------------------------------------

    async def handle_lot(self, sources: Sequence[Sequence[Entry]]) -> Exception | None:
        """Handle valid events of one topic in one transaction; how it failed if the lot
        rolled back (None: committed).

        ``sources``: the lot's entries per partition, in order. One commit (and one inbox
        and outbox statement) for all of them instead of one per event.
        """
        valid = [[e.verdict for e in source] for source in sources]
        events: list[Valid] = [v for source in valid for v in source]  # type: ignore[misc]
        route = sources[0][0].route
        m = self.metrics
        # One span for the lot, linked to each event's own: the events it emits still carry
        # on their cause's trace (``Tx.emit``), this one shows them handled together.
        span = _lot_span(route.topic, events) if spans_wanted() else None
        token = otel_context.attach(trace.set_span_in_context(span)) if span else None
        try:
            async with self.transactions.handling(events, check_first=False) as tx:
                if route.prepare is not None:
                    tx.origin = f"{route.topic} prepare"
                    await route.prepare([Received(v.event, v.envelope) for v in events], tx)
                for handling, items in runs_of(valid):  # type: ignore[arg-type]
                    tx.origin = handling.name
                    await handling.handler(items, tx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(events) > 1:
                m.batches_split.labels(m.service, route.topic).inc()
                first = sources[0][0].record
                log.info(
                    "%d events of %s[%d] could not be handled together (%s); one by one",
                    len(events),
                    first.topic,
                    first.partition,
                    type(exc).__name__,
                )
            return exc
        finally:
            if span is not None:
                otel_context.detach(token)  # type: ignore[arg-type]
                span.end()
        m.batch_size.labels(m.service, route.topic).observe(len(events))
        for v in events:
            self.count(route.topic, v.envelope.type, "handled")
        return None

    async def handle_alone(self, entry: Entry, failed: Exception | None = None) -> None:
        """Handle one valid event until it succeeds, is refused, or keeps failing on a
        healthy world; raises only if it could not even be dead-lettered.

        ``failed``: how its first attempt (a lot of this one event) failed; the retries go
        on from there rather than starting over.
        """
        v = entry.verdict
        assert isinstance(v, Valid)
        s, m, topic = self.settings, self.metrics, entry.route.topic
        backoff = Backoff(s.handler_backoff_initial_s, s.handler_backoff_max_s)
        attempt = 0
        # Its logs carry its journey's trace id.
        trace_of = v.trace
        context = (
            trace_of if isinstance(trace_of, otel_context.Context) else propagate.extract(trace_of)
        )
        token = otel_context.attach(context)
        try:
            while True:
                if failed is None:
                    try:
                        async with self.transactions.handling([v], check_first=True) as tx:
                            if tx is None:
                                log.info("duplicate %s %s ignored", v.envelope.type, v.envelope.id)
                                self.count(topic, v.envelope.type, "duplicate")
                                return
                            tx.origin = v.handling.name
                            await v.handling.handler([Received(v.event, v.envelope)], tx)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        failed = exc
                    else:
                        self.count(topic, v.envelope.type, "handled")
                        return
                exc, failed = failed, None
                if isinstance(exc, HandledBefore):
                    continue  # the inbox is asked first now
                if isinstance(exc, Refusal):
                    log.warning("refused %s %s: %s", v.envelope.type, v.envelope.id, exc)
                    invalid = Invalid(exc.reason, exc.detail or exc.reason, v.envelope.type)
                    await self.dead_letter(entry, invalid)
                    for observe in self.refusal_observers:
                        observe(exc)
                    return
                if isinstance(exc, InvalidOutgoingEvent):
                    log.error("%s", exc)
                    invalid = Invalid("invalid_output", str(exc), v.envelope.type)
                    await self.dead_letter(entry, invalid)
                    return
                if isinstance(exc, UNSTORABLE):
                    # A value no column can hold: retrying cannot help.
                    log.warning("unstorable %s %s: %s", v.envelope.type, v.envelope.id, exc)
                    error = type(exc).__name__
                    await self.dead_letter(
                        entry, Invalid("unstorable_value", error, v.envelope.type)
                    )
                    return
                m.handler_retries.labels(m.service, topic).inc()
                if is_infrastructure_error(exc) and (problem := await self._unhealthy()):
                    log.warning(
                        "%s %s waits for the infrastructure (%s): %r",
                        v.envelope.type,
                        v.envelope.id,
                        problem,
                        exc,
                    )
                    await self._wait_until_healthy(entry)
                    attempt = 0  # the outage was not the event's fault
                    backoff.reset()
                    continue
                if is_contention(exc):
                    log.info("retrying %s %s after %r", v.envelope.type, v.envelope.id, exc)
                    await backoff.sleep()
                    continue
                attempt += 1
                if attempt < s.handler_max_attempts:
                    log.warning(
                        "retrying %s %s (attempt %d): %r",
                        v.envelope.type,
                        v.envelope.id,
                        attempt,
                        exc,
                    )
                    await backoff.sleep()
                    continue
                if await self._unhealthy():
                    await self._wait_until_healthy(entry)
                    attempt = 0
                    backoff.reset()
                    continue
                log.error(
                    "giving up on %s %s after %d attempts",
                    v.envelope.type,
                    v.envelope.id,
                    attempt,
                    exc_info=exc,
                )
                error = f"{type(exc).__name__}: {exc} (after {attempt} attempts)"
                await self.dead_letter(entry, Invalid("handler_failed", error, v.envelope.type))
                return
        finally:
            otel_context.detach(token)

    async def dead_letter(self, entry: Entry, invalid: Invalid | None = None) -> None:
        """Send the record to ``<topic>.dlq`` with why; raises if the broker did not take it
        (the partition then rewinds to it rather than commit past it)."""
        invalid = invalid or entry.verdict  # type: ignore[assignment]
        assert isinstance(invalid, Invalid)
        record, topic, m = entry.record, entry.route.topic, self.metrics
        log.warning(
            "dead-lettering %s[%d]@%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            invalid.reason,
            invalid.error,
        )
        headers = dlq_headers(record, reason=invalid.reason, error=invalid.error, service=m.service)
        acknowledged = await self._send(
            self.settings.topic(f"{topic}.dlq"), record.value or b"", record.key, headers
        )
        await acknowledged
        m.dlq_messages.labels(m.service, topic, invalid.reason).inc()
        self.count(topic, invalid.ce_type, "dead_lettered")

    async def _unhealthy(self) -> str | None:
        try:
            return await self.transactions.database_problem()
        except Exception as exc:  # a probe that cannot even run says the same
            return f"{type(exc).__name__}: {exc}"

    async def _wait_until_healthy(self, entry: Entry) -> None:
        s, m, r = self.settings, self.metrics, entry.record
        m.infrastructure_waits.labels(m.service, entry.route.topic).inc()
        backoff = Backoff(s.handler_backoff_initial_s, s.handler_backoff_max_s)
        await wait_until_healthy(self._unhealthy, backoff, f"{r.topic}[{r.partition}]@{r.offset}")
