"""``omni events publish|tail``: kcat for the contract, CloudEvents-aware.

``publish`` validates the data against the event type's model before anything is sent,
fills the envelope (``ce_id``, ``ce_time``, ``ce_source``, ``traceparent``) and keys the
message as the contract says. ``tail`` decodes the envelope and the body of every message.
Both find the broker in ``.omni/dev.env`` when a dev stack runs, else in the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from omni_contracts import EVENT_TYPES, TOPICS
from omni_contracts.envelope import header_map, new_envelope
from pydantic import ValidationError

from omni_devkit.devstack.process import DevStackError


class InvalidEvent(DevStackError):
    """The event was refused before sending: the field and the reason are in the message."""


@dataclass(frozen=True)
class Target:
    """The broker to talk to and the topic prefix in use."""

    bootstrap: str
    prefix: str = ""


def find_target(state_dir: Path | None = None) -> Target:
    """The dev stack's broker (``dev.env``), else ``KAFKA_BOOTSTRAP_SERVERS``/``TOPIC_PREFIX``."""
    from omni_devkit.devstack.stack import default_state_dir, read_kv_file

    values = read_kv_file((state_dir or default_state_dir()) / "dev.env")
    values |= {
        k: os.environ[k] for k in ("KAFKA_BOOTSTRAP_SERVERS", "TOPIC_PREFIX") if k in os.environ
    }
    bootstrap = values.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise DevStackError(
            "no broker: start the dev stack (`omni dev up`) or set KAFKA_BOOTSTRAP_SERVERS"
        )
    return Target(bootstrap, values.get("TOPIC_PREFIX", ""))


def build_event(topic: str, ce_type: str, data: Any) -> Any:
    """The contract model of ``ce_type`` on ``topic`` built from ``data``, or
    :class:`InvalidEvent` naming the field and the reason."""
    if topic not in TOPICS:
        raise InvalidEvent(f"{topic!r} is not a contract topic; topics: {', '.join(TOPICS)}")
    spec = TOPICS[topic]
    if ce_type not in spec.events:
        known = ", ".join(spec.events)
        owner = EVENT_TYPES[ce_type].topic if ce_type in EVENT_TYPES else None
        hint = f" (it belongs on {owner})" if owner else ""
        raise InvalidEvent(f"{ce_type!r} is not an event type of {topic}{hint}; types: {known}")
    if not isinstance(data, dict):
        raise InvalidEvent("the event data must be a JSON object")
    try:
        return spec.events[ce_type].model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(event)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidEvent(f"invalid {ce_type}: {reasons}") from None


def _traceparent() -> str:
    # A new W3C trace: the services' spans join it, so the journey shows up as one trace.
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


async def publish(
    target: Target,
    topic: str,
    ce_type: str,
    data: Any,
    *,
    key: str | None = None,
    source: str = "/channels/cli",
) -> str:
    """Validate and publish one event; returns its ``ce_id``."""
    event = build_event(topic, ce_type, data)
    envelope = new_envelope(event, source=source)
    headers = envelope.headers() | {"traceparent": _traceparent()}
    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, acks="all")
    try:
        await producer.start()
        await producer.send_and_wait(
            target.prefix + topic,
            event.model_dump_json().encode(),
            key=(key or event.partition_key() or "").encode() or None,
            headers=[(k, v.encode()) for k, v in headers.items()],
        )
    except Exception as exc:
        raise DevStackError(f"could not publish to {target.bootstrap}: {exc}") from exc
    finally:
        await producer.stop()
    return envelope.id


def describe(record: ConsumerRecord[Any, Any], prefix: str = "") -> dict[str, Any]:
    """One consumed message as a JSON-ready dict: where it is, its envelope and its body."""
    headers = header_map(record.headers or ())
    raw = record.value or b""
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return {
        "topic": record.topic.removeprefix(prefix),
        "partition": record.partition,
        "offset": record.offset,
        "key": record.key.decode(errors="replace") if record.key is not None else None,
        "headers": headers,
        "data": body,
    }


def one_line(message: dict[str, Any]) -> str:
    """A message as one readable line: position, type, key, id, then the body."""
    h = message["headers"]
    return (
        f"{message['topic']}[{message['partition']}]@{message['offset']} "
        f"{h.get('ce_type', '?')} key={message['key']} ce_id={h.get('ce_id', '?')} "
        f"{h.get('ce_time', '')} {json.dumps(message['data'], separators=(',', ':'))}"
    )


async def tail(
    target: Target,
    topic: str,
    *,
    ce_type: str | None = None,
    key: str | None = None,
    from_beginning: bool = False,
    stop_after: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the messages of ``topic`` (matching ``ce_type``/``key``) as they arrive.

    Reads every partition directly (no consumer group: tailing never moves anyone's
    offsets). ``stop_after`` ends it after that many seconds without a message.
    """
    physical = target.prefix + topic
    consumer = AIOKafkaConsumer(bootstrap_servers=target.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        # Apache Kafka answers a metadata request for no topics with none (Tansu with all):
        # ask for this one. aiokafka has no public call that adds a topic to its metadata.
        await consumer._client.add_topic(physical)
        partitions = consumer.partitions_for_topic(physical)
        if not partitions:
            raise DevStackError(f"topic {physical} does not exist on {target.bootstrap}")
        tps = [TopicPartition(physical, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        wanted: Callable[[dict[str, Any]], bool] = lambda m: (  # noqa: E731
            (ce_type is None or m["headers"].get("ce_type") == ce_type)
            and (key is None or m["key"] == key)
        )
        while True:
            batches = await consumer.getmany(timeout_ms=int((stop_after or 1.0) * 1000))
            if not batches and stop_after is not None:
                return
            for records in batches.values():
                for record in records:
                    message = describe(record, target.prefix)
                    if wanted(message):
                        yield message
    finally:
        await consumer.stop()


def read_data(
    data: str | None, file: Path | None, from_stdin: bool, stdin: Callable[[], str]
) -> Any:
    """The event data from ``--data``, ``--file`` or ``-`` (standard input), parsed."""
    given = [x for x in (data is not None, file is not None, from_stdin) if x]
    if len(given) != 1:
        raise InvalidEvent("give the event data with exactly one of --data JSON, --file F or -")
    if from_stdin:
        text = stdin()
    elif file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise InvalidEvent(f"cannot read {file}: {exc.strerror}") from None
    else:
        text = data or ""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidEvent(f"the event data is not valid JSON: {exc}") from None


def run(coro: Any) -> Any:
    """Run a coroutine to completion from a CLI command."""
    return asyncio.run(coro)
