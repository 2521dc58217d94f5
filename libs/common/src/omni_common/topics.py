"""Create the catalogue's topics (and their dead-letter topics) on a broker."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

# The Kafka error code of a CreateTopics answer for a topic that is already there.
_TOPIC_ALREADY_EXISTS = 36
# Dead letters keep the original bytes, personal data included, and a topic cannot forget one
# record: a short retention bounds how long an erased shopper's entries can survive (a week
# to mend and replay).
DLQ_RETENTION_MS = 7 * 24 * 3600 * 1000
DLQ_MAX_PARTITIONS = 3
# Every topic's max.message.bytes (Kafka's default, made explicit): the producer's
# max_request_size is derived from it (omni_common.producer).
MAX_MESSAGE_BYTES = 1_048_576


class TopicsError(Exception):
    """Topics could not be created (unknown names, or the broker refused)."""


class BrokerUnavailableError(TopicsError):
    """The Kafka broker did not answer in time."""


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# The timeout is part of the contract (retries inside it), not a cancellation scope.
async def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Return once the broker at ``bootstrap`` answers a metadata request.

    Raises :class:`BrokerUnavailableError` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if not _any_accepts(bootstrap):
            # Plain TCP first: cheap, and aiokafka would log every refused connection.
            last_error = ConnectionRefusedError("connection refused")
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            continue
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=max(1000, int(remaining * 1000))
        )
        try:
            await asyncio.wait_for(_probe(admin), timeout=max(0.5, remaining))
            return
        except Exception as exc:  # any failure means "not yet"
            last_error = exc
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    reason = f" ({type(last_error).__name__})" if last_error else ""
    raise BrokerUnavailableError(
        f"Kafka broker at {bootstrap} did not answer within {timeout:g}s{reason}"
    )


# The timeout is part of the contract (retries inside it), not a cancellation scope.
async def wait_for_group_coordinator(
    bootstrap: str,
    timeout: float = 30.0,  # noqa: ASYNC109
    group: str = "omni-warmup",
) -> None:
    """Return once the broker names a coordinator for ``group``.

    On a fresh Apache Kafka the first FindCoordinator creates ``__consumer_offsets``; until
    its partitions have leaders every group join fails with a retriable error. Raises
    :class:`BrokerUnavailableError` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5_000)
    last_error: BaseException | None = None
    try:
        await admin.start()
        while time.monotonic() < deadline:
            try:
                await admin.find_coordinator(group)
                return
            except Exception as exc:  # coordinator not available yet
                last_error = exc
            await asyncio.sleep(0.1)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    reason = f" ({type(last_error).__name__})" if last_error else ""
    raise BrokerUnavailableError(
        f"Kafka broker at {bootstrap} had no group coordinator within {timeout:g}s{reason}"
    )


def _any_accepts(bootstrap: str) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        with contextlib.suppress(ValueError):
            if port_accepts(host.strip("[]") or "localhost", int(port), timeout=0.5):
                return True
    return False


async def _probe(admin: AIOKafkaAdminClient) -> None:
    await admin.start()
    await admin.list_topics()


def _catalogue() -> dict[str, Any]:
    from omni_contracts.catalogue import TOPICS

    return dict(TOPICS)


def _new_topics(
    prefix: str, names: Iterable[str] | None, partitions: int | None = None
) -> list[tuple[NewTopic, NewTopic]]:
    """(with configs, without configs) pairs for every topic and dead-letter topic wanted;
    ``partitions`` caps each topic's count (a machine with fewer cores than that)."""
    catalogue = _catalogue()
    wanted = list(catalogue) if names is None else list(names)
    unknown = sorted(set(wanted) - set(catalogue))
    if unknown:
        raise TopicsError(f"not in the topic catalogue: {', '.join(unknown)}")
    pairs: list[tuple[NewTopic, NewTopic]] = []
    for name in wanted:
        spec = catalogue[name]
        count = spec.partitions if partitions is None else max(1, min(spec.partitions, partitions))
        configs: dict[str, str] = (
            {"cleanup.policy": "compact"}
            if spec.compacted
            else {"cleanup.policy": "delete", "retention.ms": str(spec.retention_ms)}
        )
        configs["max.message.bytes"] = str(MAX_MESSAGE_BYTES)
        topic = f"{prefix}{spec.name}"
        pairs.append(
            (
                NewTopic(topic, count, 1, topic_configs=configs),
                NewTopic(topic, count, 1),
            )
        )
        dlq = f"{prefix}{spec.dlq}"
        dlq_partitions = max(1, min(count, DLQ_MAX_PARTITIONS))
        dlq_configs = {
            "cleanup.policy": "delete",
            "retention.ms": str(DLQ_RETENTION_MS),
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
        }
        pairs.append(
            (
                NewTopic(dlq, dlq_partitions, 1, topic_configs=dlq_configs),
                NewTopic(dlq, dlq_partitions, 1),
            )
        )
    return pairs


async def create_topics(
    bootstrap: str,
    prefix: str = "",
    names: Iterable[str] | None = None,
    partitions: int | None = None,
) -> list[str]:
    """Create the catalogue topics ``names`` (default: all) and their ``.dlq`` topics.

    Topic names get ``prefix`` prepended. Partitions come from each ``TopicSpec`` (at most
    ``partitions`` when given); dead-letter topics get 1-3 partitions. Compaction/retention
    are set where the broker accepts topic configs; a broker that rejects them gets the topics
    without. Topics that already exist are left alone. Returns the names of the topics this
    call created.
    """
    pairs = _new_topics(prefix, names, partitions)
    if not pairs:
        return []
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        await admin.start()
        created, failed = await _create(admin, [with_cfg for with_cfg, _ in pairs])
        if failed:
            # Brokers that do not support (some of) the topic configs, e.g. older Tansu
            # builds, reject the whole topic: create those again without configs.
            retry = [plain for with_cfg, plain in pairs if with_cfg.name in failed]
            more, failed = await _create(admin, retry)
            created += more
        if failed:
            reasons = "; ".join(f"{name} ({why})" for name, why in sorted(failed.items()))
            raise TopicsError(f"could not create topics: {reasons}")
        await _wait_for_leaders(admin, bootstrap, created)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return created


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, bootstrap: str, topics: list[str], timeout_s: float = 60.0
) -> None:
    """Return once every partition of ``topics`` is served by its leader.

    Apache Kafka answers CreateTopics once the controller has the topic; the broker takes a
    moment more (seconds on a busy machine) to lead the partitions, and a client arriving in
    between gets NotLeaderForPartition. First the metadata must name a leader for each
    partition, then a ListOffsets for all of them must succeed (aiokafka retries it).
    """
    pending = set(topics)
    partitions: list[TopicPartition] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for topic in await admin.describe_topics(sorted(pending)):
            found = topic.get("partitions") or []
            if (
                topic.get("error_code") == 0
                and found
                and all(p.get("error_code") == 0 and p.get("leader", -1) >= 0 for p in found)
            ):
                pending.discard(topic["topic"])
                partitions += [TopicPartition(topic["topic"], p["partition"]) for p in found]
        if pending:
            await asyncio.sleep(0.05)
    if pending:
        names = ", ".join(sorted(pending))
        raise TopicsError(f"no partition leaders after {timeout_s:g}s: {names}")
    if not partitions:
        return
    remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=remaining_ms)
    try:
        await consumer.start()
        await consumer.end_offsets(partitions)
    except KafkaError as exc:
        raise TopicsError(f"partitions not served after {timeout_s:g}s: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def _create(
    admin: AIOKafkaAdminClient, topics: list[NewTopic]
) -> tuple[list[str], dict[str, str]]:
    """Create ``topics``; return (created names, {failed name: reason}). Existing is fine."""
    response: Any = await admin.create_topics(topics, timeout_ms=30_000)
    created: list[str] = []
    failed: dict[str, str] = {}
    for error in response.topic_errors:
        name, code = error[0], error[1]
        message = error[2] if len(error) > 2 else None
        if code == 0:
            created.append(name)
        elif code != _TOPIC_ALREADY_EXISTS:
            failed[name] = f"error {code}: {message}"
    return created, failed
