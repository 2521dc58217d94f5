"""Dead-lettered messages: read them (``omni dlq list|show``) and replay them (``omni dlq
replay``) to their source topic once the cause is mended.

A dead letter is the original record (key, value, headers) plus the ``dlq_*`` headers
CONTRACT.md names. A replay sends the original back: same key, same value, same headers
(``ce_id`` included) minus ``dlq_*``, so the consumers' inbox makes a second replay harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from omni_common.producer import producer_options

DLQ_SUFFIX = ".dlq"
DLQ_HEADER_PREFIX = "dlq_"


class DlqError(Exception):
    """An expected failure of a DLQ command; its message is one line meant for humans."""


@dataclass(frozen=True)
class DeadLetter:
    """One message of a ``.dlq`` topic."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """``partition:offset``: how ``show`` and ``replay --id`` name this message."""
        return f"{self.partition}:{self.offset}"

    def header(self, name: str, default: str = "") -> str:
        """The last value of header ``name`` as text."""
        for key, value in reversed(self.headers):
            if key == name:
                return value.decode("utf-8", errors="replace")
        return default

    @property
    def reason(self) -> str:
        """Why it was dead-lettered (``dlq_reason``)."""
        return self.header("dlq_reason", "unknown")

    @property
    def ce_id(self) -> str:
        """The event id (``ce_id``), if the envelope had one."""
        return self.header("ce_id")

    def source_topic(self, default: str) -> str:
        """The (physical) topic it came from."""
        return self.header("dlq_source_topic") or default

    def replay_headers(self) -> list[tuple[str, bytes]]:
        """The original headers: everything but ``dlq_*``."""
        return [(k, v) for k, v in self.headers if not k.startswith(DLQ_HEADER_PREFIX)]


def dlq_topic_name(topic: str, prefix: str = "") -> tuple[str, str]:
    """``(physical dlq topic, physical source topic)`` for a contract topic or its ``.dlq``."""
    source = topic.removesuffix(DLQ_SUFFIX)
    return f"{prefix}{source}{DLQ_SUFFIX}", f"{prefix}{source}"


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``/``2h``/``1d`` ago, or an ISO 8601 time (UTC unless it says otherwise)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if match := _RELATIVE.match(text):
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DlqError(
            f"--since {text!r} is neither a duration (30m, 2h, 1d) nor an ISO time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _to_dead_letter(record: ConsumerRecord[Any, Any]) -> DeadLetter:
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp=datetime.fromtimestamp(record.timestamp / 1000, UTC),
        key=record.key,
        value=record.value or b"",
        headers=[(k, bytes(v or b"")) for k, v in (record.headers or ())],
    )


def matches(
    letter: DeadLetter,
    reason: str | None = None,
    since: datetime | None = None,
    refs: Iterable[str] = (),
) -> bool:
    """Whether ``letter`` passes the filters (all of those given)."""
    wanted = set(refs)
    if wanted and letter.ref not in wanted and letter.ce_id not in wanted:
        return False
    if reason is not None and letter.reason != reason:
        return False
    return since is None or letter.timestamp >= since


async def read_dead_letters(
    bootstrap: str,
    dlq_topic: str,
    *,
    reason: str | None = None,
    since: datetime | None = None,
    refs: Iterable[str] = (),
    timeout_s: float = 30.0,
) -> list[DeadLetter]:
    """Every message of ``dlq_topic`` written so far that passes the filters, oldest first
    per partition. Reads without a consumer group: listing commits nothing."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=15_000
    )
    try:
        await asyncio.wait_for(consumer.start(), timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise DlqError(f"cannot reach the Kafka broker at {bootstrap}: {exc}") from None
    try:
        partitions = await _partitions(consumer, dlq_topic)
        end = await consumer.end_offsets(partitions)
        start = await consumer.beginning_offsets(partitions)
        todo = {tp: end[tp] for tp in partitions if end[tp] > start[tp]}
        if not todo:
            return []
        consumer.assign(list(todo))
        await consumer.seek_to_beginning(*todo)
        letters: list[DeadLetter] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while todo:
            if loop.time() > deadline:
                raise DlqError(f"timed out reading {dlq_topic} ({len(letters)} read)")
            batch = await consumer.getmany(*todo, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < todo.get(tp, 0):
                        letter = _to_dead_letter(record)
                        if matches(letter, reason, since, refs):
                            letters.append(letter)
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
        return sorted(letters, key=lambda item: (item.timestamp, item.partition, item.offset))
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    # Kafka answers a metadata request for no topics with none: ask for this one.
    await consumer._client.add_topic(topic)
    found = consumer.partitions_for_topic(topic)
    if not found:
        raise DlqError(f"topic {topic} does not exist")
    return [TopicPartition(topic, p) for p in sorted(found)]


@dataclass
class ReplayResult:
    """What a replay did."""

    selected: int
    replayed: int


async def replay(
    bootstrap: str,
    letters: list[DeadLetter],
    default_source: str,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> ReplayResult:
    """Send each dead letter back to its source topic (original key, value and headers
    minus ``dlq_*``), acknowledged by the broker, in order; stop at the first failure."""
    if not letters:
        return ReplayResult(0, 0)
    options = await producer_options(bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **options.as_kwargs())
    try:
        await producer.start()
    except (KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise DlqError(f"cannot reach the Kafka broker at {bootstrap}: {exc}") from None
    done = 0
    try:
        for letter in letters:
            target = letter.source_topic(default_source)
            try:
                await producer.send_and_wait(
                    target, letter.value, key=letter.key, headers=letter.replay_headers()
                )
            except KafkaError as exc:
                raise DlqError(
                    f"replaying {letter.topic} {letter.ref} to {target} failed after "
                    f"{done} of {len(letters)}: {type(exc).__name__}: {exc}"
                ) from None
            done += 1
            progress(done, len(letters))
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
    return ReplayResult(len(letters), done)


def body_text(value: bytes) -> str:
    """The value for a human: indented JSON when it parses, else the text as it is."""
    try:
        return json.dumps(json.loads(value), indent=2, ensure_ascii=False, sort_keys=True)
    except (ValueError, UnicodeDecodeError):
        return value.decode("utf-8", errors="replace")
