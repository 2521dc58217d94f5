"""What the benchmarks share: where the stack is, consumers, a private stack, events sent
as a channel sends them, latencies and the raw broker baseline.

A benchmark runs against the dev stack when one is up (``.omni/dev.env``), else it starts a
private stack of the services it needs in a temporary directory, as ``omni dev up`` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from omni_contracts import Event
from omni_contracts.envelope import encode, header_map, new_envelope

from omni_devkit.cli import fail
from omni_devkit.devstack.process import DevStackError

# ce_source of every event a benchmark sends, as the channel it stands for.
BENCH_SOURCE = "/channels/bench"

T = TypeVar("T")


@dataclass(frozen=True)
class StackTarget:
    """Where a stack under test answers: the broker, the services' URLs and an API key."""

    bootstrap: str
    urls: dict[str, str]
    api_key: str
    topic_prefix: str = ""
    # The stack's processes by name (kafka, postgres, each service), when known: their CPU
    # is what a bench reports per unit of work.
    pids: dict[str, int] = field(default_factory=dict)
    database_url: str | None = None

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
    pid_file = env_file.with_name("dev.pid")
    pids = {
        k: int(v)
        for k, v in read_kv_file(pid_file).items()
        if k not in ("supervisor", "console") and v.isdigit()
    }
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
        pids,
        values.get("DATABASE_URL"),
    )


@contextlib.contextmanager
def private_stack(services: Sequence[str], say: Callable[[str], None]) -> Iterator[StackTarget]:
    """A private stack (PostgreSQL, broker, ``services`` as processes) in a temp dir."""
    from omni_devkit.devstack.stack import DevStack, DevStackConfig, read_kv_file, read_pids

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
                pids = {
                    k: v for k, v in read_pids(config).items() if k not in ("supervisor", "console")
                }
                yield StackTarget(
                    env["KAFKA_BOOTSTRAP_SERVERS"],
                    {s: env[_url_key(s)] for s in services},
                    env["API_KEY"],
                    pids=pids,
                    database_url=env.get("DATABASE_URL"),
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
    services: Sequence[str],
    *,
    embedded: bool,
    say: Callable[[str], None],
    state_dir: Path | None = None,
) -> Iterator[StackTarget]:
    """The dev stack (of ``state_dir``, default ``.omni``) if one runs and ``embedded`` is not
    asked, else a private one."""
    if not embedded:
        try:
            yield dev_stack_target(services, state_dir)
            return
        except DevStackError as exc:
            say(f"{exc}; starting a private stack instead")
    with private_stack(services, say) as target:
        yield target


def progress(quiet: bool) -> Callable[[str], None]:
    """How a bench tells what it is doing: each line on stdout at once, or nothing when
    ``quiet`` (``--json`` keeps stdout to its one line)."""

    def say(line: str) -> None:
        if not quiet:
            typer.echo(line)
            sys.stdout.flush()

    return say


def run_on_stack(
    services: Sequence[str],
    work: Callable[[StackTarget], Coroutine[Any, Any, T]],
    *,
    embedded: bool,
    say: Callable[[str], None],
    state_dir: Path | None = None,
) -> T:
    """``work(target)`` on the stack :func:`stack_for` finds or starts; a stack that cannot
    be had or does not answer ends the command with one line, not a traceback."""
    try:
        with stack_for(services, embedded=embedded, say=say, state_dir=state_dir) as target:
            return asyncio.run(work(target))
    except DevStackError as exc:
        fail(str(exc))
    except (OSError, httpx.HTTPError) as exc:
        fail(f"the stack did not answer: {type(exc).__name__}: {exc}")


@contextlib.asynccontextmanager
async def own_group_consumer(
    bootstrap: str, topic: str, group: str, *, fetch_max_wait_ms: int | None = None
) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer in its own group, as a channel's would be, starting at the end.

    It waits on the broker as the services do (unless told): Apache Kafka answers a fetch as
    soon as data arrives, so a long wait costs no latency and no empty fetches; Tansu holds
    an empty fetch for the whole wait, so it gets a short one.
    """
    if fetch_max_wait_ms is None:
        fetch_max_wait_ms = await fetch_wait_for(bootstrap)
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


_FETCH_WAITS: dict[str, int] = {}


async def fetch_wait_for(bootstrap: str) -> int:
    """The fetch wait the services use on the broker at ``bootstrap``."""
    if bootstrap not in _FETCH_WAITS:
        from omni_common.kafka import KAFKA_FETCH_MAX_WAIT_MS, TANSU_FETCH_MAX_WAIT_MS
        from omni_common.producer import idempotence_supported

        kafka, _ = await idempotence_supported(bootstrap, timeout_s=5)
        _FETCH_WAITS[bootstrap] = KAFKA_FETCH_MAX_WAIT_MS if kafka else TANSU_FETCH_MAX_WAIT_MS
    return _FETCH_WAITS[bootstrap]


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


def send_args(event: Event, prefix: str = "") -> dict[str, Any]:
    """``AIOKafkaProducer.send`` keyword arguments for ``event`` sent as a channel sends it:
    its (prefixed) contract topic, JSON value, partition key and CloudEvents headers."""
    envelope = new_envelope(event, source=BENCH_SOURCE)
    return {
        "topic": prefix + event.topic,
        "value": encode(event),
        "key": (event.partition_key() or "").encode(),
        "headers": [(k, v.encode()) for k, v in envelope.headers().items()],
    }


def ce_id(args: dict[str, Any]) -> str:
    """The ``ce_id`` of :func:`send_args`' event: what a reaction names as its causation."""
    return header_map(args["headers"])["ce_id"]


async def put_location(http: httpx.AsyncClient, location_id: str, body: dict[str, Any]) -> None:
    """Create or update a bench location through inventory's API (``PUT /locations/{id}``)."""
    response = await http.put(f"/locations/{location_id}", json=body)
    if response.status_code not in (200, 201):
        raise DevStackError(
            f"inventory refused PUT /locations/{location_id}: {response.status_code} "
            f"{response.text[:200]}"
        )


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


# -- latencies: publish -> receive -------------------------------------------------------------


@dataclass(frozen=True)
class Latencies:
    """Publish-to-receive latencies of one phase, in milliseconds, and how many were sent."""

    samples: list[float]
    sent: int

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (nearest rank), or NaN without samples."""
        return percentile(self.samples, q)


async def paced(rate: float, count: int) -> AsyncIterator[int]:
    """Yield 0..count-1 at ``rate`` per second on a fixed schedule (no drift)."""
    start = time.perf_counter()
    for n in range(count):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield n


class Inflight:
    """Messages published and not yet seen by the measuring consumer."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.unmeasured: set[str] = set()
        self.samples: list[float] = []
        self._empty = asyncio.Event()
        self._empty.set()

    def published(self, ident: str, *, measured: bool = True) -> None:
        """Note that ``ident`` was published just now."""
        if not measured:
            self.unmeasured.add(ident)
        self._empty.clear()
        self.sent[ident] = time.perf_counter()

    def received(self, ident: str, at: float) -> None:
        """Note that ``ident`` arrived at ``at`` (perf_counter seconds)."""
        published = self.sent.pop(ident, None)
        if published is not None and ident not in self.unmeasured:
            self.samples.append((at - published) * 1000)
        if not self.sent:
            self._empty.set()

    async def drain(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout``) until everything published has arrived."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout)


async def record_arrivals(
    consumer: AIOKafkaConsumer,
    inflight: Inflight,
    key_of: Callable[[dict[str, str]], str | None],
    done: asyncio.Event,
) -> None:
    """Until ``done``: every record whose headers name (``key_of``) an awaited id arrived now."""
    while not done.is_set():
        batches = await consumer.getmany(timeout_ms=50)
        now = time.perf_counter()
        for records in batches.values():
            for record in records:
                ident = key_of(header_map(record.headers or ()))
                if ident is not None:
                    inflight.received(ident, now)


# -- CPU of the stack, and waiting for it to finish ---------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, of its children that have ended (PostgreSQL's backends of
    connections closed meanwhile) and of its live descendants."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(pid)
        times = process.cpu_times()
        total += times.children_user + times.children_system
        family = [process]
        with contextlib.suppress(psutil.Error):
            family += process.children(recursive=True)
        for member in family:
            with contextlib.suppress(psutil.Error):
                times = member.cpu_times()
                total += times.user + times.system
    return total


class CpuMeter:
    """CPU seconds each named process tree spent between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._before: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def start(self) -> CpuMeter:
        """Take the first reading."""
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        """Take the second reading; returns the seconds spent per process."""
        self.spent = {
            name: max(0.0, cpu_seconds(pid) - self._before.get(name, 0.0))
            for name, pid in self.pids.items()
        }
        return self.spent

    def per_unit_ms(self, units: int) -> dict[str, float]:
        """Milliseconds of CPU per unit of work, per process and in total."""
        figures = {name: round(1000 * s / units, 3) for name, s in sorted(self.spent.items())}
        figures["total"] = round(1000 * sum(self.spent.values()) / units, 3)
        return figures


async def until_drained(
    bootstrap: str, groups: Sequence[str], *, timeout_s: float = 120.0, settle_s: float = 1.5
) -> None:
    """Wait until every consumer group has committed the end of every partition it reads,
    and nothing more arrives for ``settle_s`` (relays publish what handlers wrote)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await probe.start()
    try:
        deadline = time.monotonic() + timeout_s
        quiet_since: float | None = None
        last: dict[Any, int] = {}
        while True:
            lag, ends = 0, {}
            for group in groups:
                committed = await admin.list_consumer_group_offsets(group)
                if not committed:
                    continue
                tps = list(committed)
                group_ends = await probe.end_offsets(tps)
                ends.update(group_ends)
                lag += sum(max(0, group_ends[tp] - committed[tp].offset) for tp in tps)
            now = time.monotonic()
            if lag == 0 and ends == last:
                quiet_since = quiet_since or now
                if now - quiet_since >= settle_s:
                    return
            else:
                quiet_since = None
            last = ends
            if now > deadline:
                raise DevStackError(f"the stack did not drain within {timeout_s:g} s (lag {lag})")
            await asyncio.sleep(0.25)
    finally:
        await probe.stop()
        await admin.close()
