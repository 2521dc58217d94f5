"""Dead-lettered messages: read them (``omni dlq list|show``), replay them (``omni dlq
replay``) to their source topic once the cause is mended, and purge one shopper's from every
DLQ after an erasure (``omni dlq purge``).

A dead letter is the original record (key, value, headers) plus the ``dlq_*`` headers
CONTRACT.md names. A replay sends the original back: same key, same value, same headers
(``ce_id`` included) minus ``dlq_*``, so the consumers' inbox makes a second replay harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
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


# -- purge: one shopper's entries out of every DLQ ------------------------------------------

REWRITTEN_FROM_HEADER = "dlq_rewritten_from"
"""On a dead letter a purge copied: ``partition:offset`` where it was first dead-lettered.
A ``dlq_*`` header, so a replay leaves it behind like the others."""

# Characters that continue an identifier: ``c-1`` is not named by ``c-12`` or ``abc-1``.
_ID_CHARS = r"A-Za-z0-9_\-"


@dataclass(frozen=True)
class Shopper:
    """What names a shopper in a dead letter: the customer id and, when the operator knows
    them, e-mails, phone numbers and other identifiers (loyalty cards, anonymous ids)."""

    customer_id: str
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    identifiers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.customer_id.strip():
            raise DlqError("--customer must name a customer id")

    def _patterns(self) -> list[re.Pattern[str]]:
        tokens = [self.customer_id, *self.identifiers]
        patterns = [
            re.compile(rf"(?<![{_ID_CHARS}]){re.escape(t)}(?![{_ID_CHARS}])") for t in tokens if t
        ]
        patterns += [re.compile(re.escape(e), re.IGNORECASE) for e in self.emails if e]
        for phone in self.phones:
            # The digits in order, whatever the separators: "+33 6 12" is "+33612".
            digits = re.sub(r"\D", "", phone)
            if digits:
                spaced = r"[\s().\-/]*".join(digits)
                patterns.append(re.compile(rf"(?<!\d){spaced}(?!\d)"))
        return patterns

    def named_in(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` names this shopper: its key, any header (``ce_subject`` and
        the others), or anywhere in its value, parseable or not."""
        patterns = self._patterns()
        texts = [
            (letter.key or b"").decode("utf-8", errors="replace"),
            letter.value.decode("utf-8", errors="replace"),
            *(v.decode("utf-8", errors="replace") for _, v in letter.headers),
        ]
        if any(p.search(text) for p in patterns for text in texts):
            return True
        # JSON may escape what the shopper typed (``\u00e9``, ``\/``): look at it decoded too.
        try:
            decoded = json.dumps(json.loads(letter.value), ensure_ascii=False)
        except (ValueError, UnicodeDecodeError):
            return False
        return any(p.search(decoded) for p in patterns)


def _origin(letter: DeadLetter) -> str:
    """Where ``letter`` was first dead-lettered (kept across purges)."""
    return letter.header(REWRITTEN_FROM_HEADER) or letter.ref


@dataclass
class PartitionPurge:
    """What a purge did (or would do) to one partition of a DLQ."""

    partition: int
    removed: int = 0
    kept: int = 0
    already_copied: int = 0
    deleted_before: int | None = None


@dataclass
class TopicPurge:
    """What a purge did (or would do) to one DLQ topic."""

    topic: str
    exists: bool = True
    read: int = 0
    partitions: list[PartitionPurge] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(p.removed for p in self.partitions)

    @property
    def rewritten(self) -> int:
        return sum(p.kept for p in self.partitions)

    def summary(self, dry_run: bool = False) -> str:
        if not self.exists:
            return f"{self.topic}: not on the broker, nothing to purge"
        if not self.partitions:
            return f"{self.topic}: {self.read} read, none names the shopper"
        verb = "would remove" if dry_run else "removed"
        copied = sum(p.already_copied for p in self.partitions)
        again = f" ({copied} copied by an earlier run)" if copied else ""
        return (
            f"{self.topic}: {self.read} read, {verb} {self.removed} naming the shopper, "
            f"{'would rewrite' if dry_run else 'rewrote'} {self.rewritten} others{again}"
        )


def catalogue_dlq_topics(prefix: str = "") -> list[str]:
    """Every DLQ topic of the catalogue: ``<prefix><topic>.dlq`` (``TopicSpec.dlq``)."""
    from omni_contracts.catalogue import TOPICS

    return sorted(f"{prefix}{spec.dlq}" for spec in TOPICS.values())


async def purge_customer(
    bootstrap: str,
    topics: Iterable[str],
    shopper: Shopper,
    *,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda line: None,
    timeout_s: float = 120.0,
) -> list[TopicPurge]:
    """Remove every dead letter naming ``shopper`` from ``topics``.

    Kafka cannot delete one record, only a partition's prefix (DeleteRecords). So, per
    partition: read it to its end, copy every *other* record up to the last one naming the
    shopper to the end of the same partition (key, value, headers and timestamp kept, plus
    :data:`REWRITTEN_FROM_HEADER`; the timestamp keeps the retention counting from the
    original dead-lettering), wait until the broker has them all, then delete the
    partition's records before that last offset + 1. Safe to run again, even after a run
    that stopped half-way: a record whose copy is already past that offset is not copied
    twice, and a partition naming nobody is not touched. Dead letters written meanwhile land
    after the snapshot and are left alone.
    """
    admin = await _start_admin(bootstrap)
    results: list[TopicPurge] = []
    producer: AIOKafkaProducer | None = None
    try:
        try:
            found = set(await admin.list_topics())
        except KafkaError as exc:
            raise DlqError(f"cannot list the topics at {bootstrap}: {exc}") from None
        for topic in topics:
            result = TopicPurge(topic)
            results.append(result)
            if topic not in found:
                result.exists = False
                progress(result.summary(dry_run))
                continue
            letters = await read_dead_letters(bootstrap, topic, timeout_s=timeout_s)
            result.read = len(letters)
            by_partition: dict[int, list[DeadLetter]] = {}
            for letter in letters:
                by_partition.setdefault(letter.partition, []).append(letter)
            for partition, in_partition in sorted(by_partition.items()):
                in_partition.sort(key=lambda item: item.offset)
                named = [item for item in in_partition if shopper.named_in(item)]
                if not named:
                    continue
                last = named[-1].offset
                done = PartitionPurge(partition, removed=len(named))
                result.partitions.append(done)
                copied = {_origin(item) for item in in_partition if item.offset > last}
                named_offsets = {item.offset for item in named}
                to_copy = []
                for item in in_partition:
                    if item.offset > last or item.offset in named_offsets:
                        continue
                    if _origin(item) in copied:
                        done.already_copied += 1
                    else:
                        to_copy.append(item)
                done.kept = len(to_copy)
                if dry_run:
                    continue
                if to_copy and producer is None:
                    producer = await _start_producer(bootstrap)
                if to_copy:
                    assert producer is not None
                    await _copy(producer, to_copy)
                done.deleted_before = await _delete_before(admin, topic, partition, last + 1)
                progress(
                    f"  {topic} partition {partition}: {done.removed} removed, {done.kept} "
                    f"rewritten, records before offset {last + 1} deleted"
                )
            progress(result.summary(dry_run))
    finally:
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        with contextlib.suppress(Exception):
            await admin.close()
    return results


async def _start_producer(bootstrap: str) -> AIOKafkaProducer:
    options = await producer_options(bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **options.as_kwargs())
    try:
        await producer.start()
    except (KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise DlqError(f"cannot reach the Kafka broker at {bootstrap}: {exc}") from None
    return producer


async def _start_admin(bootstrap: str) -> Any:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        await asyncio.wait_for(admin.start(), 30)
    except (KafkaError, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await admin.close()
        raise DlqError(f"cannot reach the Kafka broker at {bootstrap}: {exc}") from None
    return admin


async def _copy(producer: AIOKafkaProducer, letters: Sequence[DeadLetter]) -> None:
    """Copy ``letters`` to the end of their partitions; returns once the broker has them
    all (sent together: one wait for the lot, not a round trip per record)."""
    try:
        sent = []
        for letter in letters:
            headers = [(k, v) for k, v in letter.headers if k != REWRITTEN_FROM_HEADER]
            headers.append((REWRITTEN_FROM_HEADER, _origin(letter).encode()))
            sent.append(
                await producer.send(
                    letter.topic,
                    letter.value,
                    key=letter.key,
                    partition=letter.partition,
                    timestamp_ms=round(letter.timestamp.timestamp() * 1000),
                    headers=headers,
                )
            )
        await asyncio.gather(*sent)
    except KafkaError as exc:
        first = letters[0]
        raise DlqError(
            f"rewriting {first.topic} partition {first.partition} failed, nothing deleted from"
            f" that partition (run the purge again): {type(exc).__name__}: {exc}"
        ) from None


async def _delete_before(admin: Any, topic: str, partition: int, offset: int) -> int:
    from aiokafka.admin import RecordsToDelete

    tp = TopicPartition(topic, partition)
    try:
        low = await admin.delete_records({tp: RecordsToDelete(before_offset=offset)})
    except (KafkaError, OSError) as exc:
        raise DlqError(
            f"the broker refused to delete {topic} partition {partition} before offset "
            f"{offset} (its copies are written; run the purge again): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return int(low.get(tp, offset))
