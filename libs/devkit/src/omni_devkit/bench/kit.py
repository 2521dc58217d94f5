"""What the services' benchmarks share: where the stack is, consumers, a private stack.

A benchmark runs against the dev stack when one is up (``.omni/dev.env``), else it starts a
private stack of the services it needs in a temporary directory, as ``omni dev up`` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from omni_devkit.devstack.process import DevStackError


@dataclass(frozen=True)
class StackTarget:
    """Where a stack under test answers: the broker, the services' URLs and an API key."""

    bootstrap: str
    urls: dict[str, str]
    api_key: str
    topic_prefix: str = ""

    def url(self, service: str) -> str:
        """The base URL of ``service``."""
        try:
            return self.urls[service]
        except KeyError:
            raise DevStackError(f"the stack runs no {service} service") from None


def _url_key(service: str) -> str:
    return f"{service.upper().replace('-', '_')}_URL"


def dev_stack_target(services: Sequence[str], state_dir: Path | None = None) -> StackTarget:
    """The running dev stack, from ``dev.env``; environment variables take precedence."""
    from omni_devkit.devstack.stack import default_state_dir, read_kv_file

    env_file = (state_dir or default_state_dir()) / "dev.env"
    values = read_kv_file(env_file)
    wanted = ["KAFKA_BOOTSTRAP_SERVERS", "API_KEY", "TOPIC_PREFIX", *map(_url_key, services)]
    values |= {k: os.environ[k] for k in wanted if os.environ.get(k)}
    missing = [k for k in wanted if k != "TOPIC_PREFIX" and k not in values]
    if missing:
        raise DevStackError(f"no dev stack found ({env_file} lacks {', '.join(missing)})")
    return StackTarget(
        values["KAFKA_BOOTSTRAP_SERVERS"],
        {s: values[_url_key(s)] for s in services},
        values["API_KEY"],
        values.get("TOPIC_PREFIX", ""),
    )


@contextlib.contextmanager
def private_stack(services: Sequence[str], say: Callable[[str], None]) -> Iterator[StackTarget]:
    """A private stack (PostgreSQL, broker, ``services`` as processes) in a temp dir."""
    from omni_devkit.devstack.stack import DevStack, DevStackConfig, read_kv_file

    previous = os.environ.get("OMNI_SERVICES")
    os.environ["OMNI_SERVICES"] = ",".join(services)
    try:
        with tempfile.TemporaryDirectory(prefix="omni-bench-") as state:
            config = DevStackConfig.with_free_ports(
                Path(state), services=len(services), fast_postgres=True
            )
            stack = DevStack(config, echo=say)
            stack.up()
            try:
                env = read_kv_file(config.env_file)
                yield StackTarget(
                    env["KAFKA_BOOTSTRAP_SERVERS"],
                    {s: env[_url_key(s)] for s in services},
                    env["API_KEY"],
                )
            finally:
                stack.stop(quiet=True)
    finally:
        if previous is None:
            os.environ.pop("OMNI_SERVICES", None)
        else:
            os.environ["OMNI_SERVICES"] = previous


@contextlib.contextmanager
def infrastructure(
    say: Callable[[str], None], *, name: str, durable: bool = False
) -> Iterator[tuple[str, str]]:
    """``(bootstrap, PostgreSQL server URL)`` for a bench that runs services in-process.

    ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` when both are set; else an embedded
    broker (the one the dev stack and the tests choose: Apache Kafka when Java is here) and
    an embedded PostgreSQL (with fsync only when ``durable``) in a temporary directory.
    """
    bootstrap, database = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("DATABASE_URL")
    if bootstrap and database:
        yield bootstrap, database
        return
    from omni_devkit.devstack.kafka import choose_broker, make_broker
    from omni_devkit.devstack.postgres import EmbeddedPostgres
    from omni_devkit.devstack.process import free_port

    root = Path(tempfile.mkdtemp(prefix=f"omni-bench-{name}-"))
    choice = choose_broker()
    say(f"starting an embedded {choice.kind} ({choice.reason}) and PostgreSQL ...")
    broker = make_broker(
        choice, free_port(), data_dir=root / "kafka", log_path=root / "broker.log", echo=say
    )
    postgres = EmbeddedPostgres(
        root / "pgdata", free_port(), fast=not durable, log_path=root / "pg.log"
    )
    broker.start(timeout=90.0)
    try:
        postgres.start()
        try:
            yield broker.bootstrap_servers, postgres.url()
        finally:
            postgres.stop()
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def stack_for(
    services: Sequence[str], *, embedded: bool, say: Callable[[str], None]
) -> Iterator[StackTarget]:
    """The dev stack if one runs (and ``embedded`` is not asked), else a private one."""
    if not embedded:
        try:
            yield dev_stack_target(services)
            return
        except DevStackError as exc:
            say(f"{exc}; starting a private stack instead")
    with private_stack(services, say) as target:
        yield target


@contextlib.asynccontextmanager
async def own_group_consumer(
    bootstrap: str, topic: str, group: str, *, fetch_max_wait_ms: int = 5
) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer in its own group, as a channel's would be, starting at the end."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="latest",
        enable_auto_commit=True,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def until_assigned(consumers: Sequence[AIOKafkaConsumer], timeout_s: float = 60.0) -> None:
    """Wait until every consumer owns its partitions and knows its positions."""
    deadline = time.monotonic() + timeout_s
    for consumer in consumers:
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise DevStackError("bench consumers were not assigned partitions in time")
            await consumer.getmany(timeout_ms=100)
        for tp in consumer.assignment():
            await consumer.position(tp)


async def ensure_topics(bootstrap: str, names: Sequence[str], partitions: int = 12) -> None:
    """Create the bench's own topics when missing."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, partitions, 1) for t in names if t not in existing]
        if missing:
            with contextlib.suppress(Exception):  # created meanwhile by another bench
                await admin.create_topics(missing)
    finally:
        await admin.close()


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank), or NaN without samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def raw_round_trip_rate(bootstrap: str, topic: str, run: str, count: int) -> float:
    """Messages per second produced and consumed through one topic, no service work: the
    baseline a bench measures its services against in the same run."""
    await ensure_topics(bootstrap, [topic])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        async with own_group_consumer(bootstrap, topic, f"bench-{run}-raw") as consumer:
            await until_assigned([consumer])
            started = time.perf_counter()
            sends = [
                await producer.send(topic, b'{"n": %d}' % n, key=str(n % 12).encode())
                for n in range(count)
            ]
            await asyncio.gather(*sends)
            received = 0
            while received < count:
                batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                if not batches and time.perf_counter() - started > 60:
                    raise DevStackError(f"raw: only {received} of {count} messages came back")
                received += sum(len(records) for records in batches.values())
            return count / (time.perf_counter() - started)
    finally:
        await producer.stop()
