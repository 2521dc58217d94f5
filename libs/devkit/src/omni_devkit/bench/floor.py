"""``omni bench floor``: what the work of a checkout costs the broker and PostgreSQL alone.

The platform's CPU per checkout is only meaningful beside the cost of the work itself. While
checkouts run, this module notes what they made the stack do:

- **Kafka**: the records each topic received (from its end offsets) and how many consumer
  groups of the stack read it, with a sample of the records themselves (value, key and
  headers, so sizes are the real ones);
- **PostgreSQL**: the rows each table of the services had inserted, updated and deleted
  (``pg_stat_user_tables``), with the tables' row widths and index counts.

Then, in the same run, on the same broker and database and with no service involved, it
does that work the cheapest way: the same records produced (batched) and consumed by as many
groups, and the same number of rows written to tables of the same width and indexes, in
multi-row statements, a commit with ``fsync`` per lot of 64 checkouts. The CPU of the
broker, of PostgreSQL and of this process (the clients) over that replay, per checkout, is
the floor. PostgreSQL reports its counters with a delay of up to ten seconds for idle
connections, so the bench waits that long before reading them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import asyncpg
import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from omni_devkit.bench.kit import CpuMeter, StackTarget, cpu_seconds, progress, run_on_stack
from omni_devkit.cli import bench_app
from omni_devkit.devstack.process import DevStackError

LOT = 64  # checkouts per transaction of the replay: the runtime's largest lot
STATS_FLUSH_S = 11.0  # PostgreSQL's idle backends report their counters within 10 s
SAMPLES_PER_TOPIC = 50


@dataclass
class TopicWork:
    """What one topic received during the run and who read it."""

    produced: int
    groups: int
    partitions: int
    samples: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )


@dataclass
class TableWork:
    """What one table had written during the run."""

    inserted: int
    updated: int
    deleted: int
    width: int
    indexes: int


@dataclass
class Work:
    """What ``units`` checkouts made the broker and PostgreSQL do."""

    units: int
    topics: dict[str, TopicWork]
    tables: dict[str, TableWork]

    def as_json(self) -> dict[str, Any]:
        """Per checkout, for the report."""
        n = self.units or 1
        return {
            "records_produced": round(sum(t.produced for t in self.topics.values()) / n, 2),
            "records_consumed": round(
                sum(t.produced * t.groups for t in self.topics.values()) / n, 2
            ),
            "rows_written": round(
                sum(t.inserted + t.updated + t.deleted for t in self.tables.values()) / n, 2
            ),
        }


class WorkRecorder:
    """Notes the broker's and PostgreSQL's counters before and after a run."""

    def __init__(self, target: StackTarget, consumers_of: dict[str, int]) -> None:
        if not target.database_url:
            raise DevStackError("the floor needs the stack's DATABASE_URL")
        self.target = target
        # physical topic -> how many consumer groups of the stack read it
        self.consumers_of = consumers_of
        self._ends: dict[TopicPartition, int] = {}
        self._rows: dict[str, tuple[int, int, int]] = {}

    async def start(self) -> None:
        """The counters before the run."""
        self._ends = await _end_offsets(self.target.bootstrap, list(self.consumers_of))
        self._rows = await _row_counters(self.target.database_url or "")

    async def stop(self, units: int, say: Callable[[str], None]) -> Work:
        """The counters after the run (once PostgreSQL has reported them)."""
        ends = await _end_offsets(self.target.bootstrap, list(self.consumers_of))
        say(f"floor: waiting {STATS_FLUSH_S:g} s for PostgreSQL to report its counters ...")
        await asyncio.sleep(STATS_FLUSH_S)
        rows = await _row_counters(self.target.database_url or "")
        topics: dict[str, TopicWork] = {}
        for topic, groups in self.consumers_of.items():
            tps = [tp for tp in ends if tp.topic == topic]
            produced = sum(ends[tp] - self._ends.get(tp, 0) for tp in tps)
            if produced:
                work = TopicWork(produced, groups, len(tps))
                work.samples = await _sample(self.target.bootstrap, topic, self._ends, ends)
                topics[topic] = work
        shapes = await _table_shapes(self.target.database_url or "")
        tables: dict[str, TableWork] = {}
        for name, (ins, upd, dele) in rows.items():
            i0, u0, d0 = self._rows.get(name, (0, 0, 0))
            if (ins - i0, upd - u0, dele - d0) != (0, 0, 0):
                width, indexes = shapes.get(name, (64, 1))
                tables[name] = TableWork(ins - i0, upd - u0, dele - d0, width, indexes)
        return Work(units, topics, tables)


async def _end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        described = await admin.describe_topics(list(topics))
        tps = [
            TopicPartition(d["topic"], p["partition"])
            for d in described
            if not d.get("error_code")
            for p in d.get("partitions") or ()
        ]
        return dict(await consumer.end_offsets(tps)) if tps else {}
    finally:
        await consumer.stop()
        await admin.close()


async def _sample(
    bootstrap: str,
    topic: str,
    before: dict[TopicPartition, int],
    after: dict[TopicPartition, int],
) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """Up to ``SAMPLES_PER_TOPIC`` of the records ``topic`` received during the run."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    samples: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    try:
        tps = [tp for tp in after if tp.topic == topic and after[tp] > before.get(tp, 0)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, max(before.get(tp, 0), after[tp] - SAMPLES_PER_TOPIC))
        deadline = time.monotonic() + 10
        while len(samples) < SAMPLES_PER_TOPIC and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            if not batches:
                break
            for records in batches.values():
                samples += [(r.key, r.value, list(r.headers or ())) for r in records]
    finally:
        await consumer.stop()
    return samples[:SAMPLES_PER_TOPIC]


async def _row_counters(database_url: str) -> dict[str, tuple[int, int, int]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT schemaname || '.' || relname AS name, n_tup_ins, n_tup_upd, n_tup_del"
            " FROM pg_stat_user_tables WHERE schemaname NOT LIKE 'floor%'"
        )
    finally:
        await conn.close()
    return {r["name"]: (r["n_tup_ins"], r["n_tup_upd"], r["n_tup_del"]) for r in rows}


async def _table_shapes(database_url: str) -> dict[str, tuple[int, int]]:
    """Average row width (bytes) and index count of every user table."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT n.nspname || '.' || c.relname AS name,"
            " coalesce((SELECT sum(s.avg_width) FROM pg_stats s"
            "  WHERE s.schemaname = n.nspname AND s.tablename = c.relname), 0)::int AS width,"
            " (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid)::int AS indexes"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        )
    finally:
        await conn.close()
    return {r["name"]: (max(16, r["width"]), max(1, r["indexes"])) for r in rows}


@dataclass(frozen=True)
class Floor:
    """CPU milliseconds per checkout the work costs without the platform."""

    kafka_ms: float
    postgres_ms: float
    client_ms: float

    @property
    def total_ms(self) -> float:
        """All of it."""
        return self.kafka_ms + self.postgres_ms + self.client_ms

    def as_json(self) -> dict[str, float]:
        """The figures as one JSON object."""
        return {
            "kafka": round(self.kafka_ms, 3),
            "postgres": round(self.postgres_ms, 3),
            "client": round(self.client_ms, 3),
            "total": round(self.total_ms, 3),
        }


async def replay(target: StackTarget, work: Work, say: Callable[[str], None]) -> Floor:
    """Do ``work`` the cheapest way on the stack's broker and database; its CPU per unit."""
    infrastructure = {k: v for k, v in target.pids.items() if k in ("kafka", "postgres")}
    if set(infrastructure) != {"kafka", "postgres"}:
        raise DevStackError("the floor needs the stack's broker and database processes")
    run = uuid.uuid4().hex[:8]
    meter = CpuMeter(infrastructure).start()
    client_before = cpu_seconds(os.getpid())
    say(f"floor: the same records through the broker ({len(work.topics)} topics) ...")
    await _replay_kafka(target.bootstrap, work, run)
    say(f"floor: the same rows into PostgreSQL ({len(work.tables)} tables) ...")
    await _replay_postgres(target.database_url or "", work, run)
    spent = meter.stop()
    client = cpu_seconds(os.getpid()) - client_before
    n = work.units or 1
    return Floor(1000 * spent["kafka"] / n, 1000 * spent["postgres"] / n, 1000 * client / n)


async def _replay_kafka(bootstrap: str, work: Work, run: str) -> None:
    topics = {f"floor-{run}-{i}": (name, t) for i, (name, t) in enumerate(work.topics.items())}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, max(1, t.partitions), 1) for name, (_, t) in topics.items()]
        )
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
        await producer.start()
        try:
            sends = []
            for name, (_, t) in topics.items():
                for i in range(t.produced):
                    key, value, headers = (
                        t.samples[i % len(t.samples)]
                        if t.samples
                        else (
                            None,
                            b"{}",
                            [],
                        )
                    )
                    sends.append(await producer.send(name, value, key=key, headers=headers))
            await asyncio.gather(*sends)
        finally:
            await producer.stop()
        readers = [
            _read_all(bootstrap, name, f"floor-{run}-{name}-{g}", t.produced)
            for name, (_, t) in topics.items()
            for g in range(t.groups)
        ]
        await asyncio.gather(*readers)
    finally:
        await admin.delete_topics(list(topics))
        await admin.close()


async def _read_all(bootstrap: str, topic: str, group: str, count: int) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received, deadline = 0, time.monotonic() + 120
        while received < count:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            received += sum(len(records) for records in batches.values())
            if time.monotonic() > deadline:
                raise DevStackError(f"floor: {topic} gave {received} of {count} records")
            if batches:
                await consumer.commit()
        await consumer.commit()
    finally:
        await consumer.stop()


async def _replay_postgres(database_url: str, work: Work, run: str) -> None:
    schema = f"floor_{run}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        names = {}
        for i, (name, t) in enumerate(work.tables.items()):
            table = f"{schema}.t{i}"
            names[name] = table
            extra = ", ".join(f"k{j} bigint" for j in range(1, t.indexes))
            await conn.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, payload bytea"
                + (f", {extra}" if extra else "")
                + ")"
            )
            for j in range(1, t.indexes):
                await conn.execute(f"CREATE INDEX ON {table} (k{j})")
        lots = max(1, -(-work.units // LOT))
        for lot in range(lots):
            async with conn.transaction():
                for name, t in work.tables.items():
                    await _write_share(conn, names[name], t, lot, lots)
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


def _share(total: int, lot: int, lots: int) -> range:
    start, end = total * lot // lots, total * (lot + 1) // lots
    return range(start, end)


async def _write_share(
    conn: asyncpg.Connection, table: str, t: TableWork, lot: int, lots: int
) -> None:
    """This lot's share of the table's inserts, updates and deletes: a statement each."""
    keys = [f"k{j}" for j in range(1, t.indexes)]
    columns = ", ".join(["id", "payload", *keys])
    inserted = list(_share(t.inserted, lot, lots))
    if inserted:
        payload = os.urandom(t.width)
        await conn.copy_records_to_table(
            table.split(".")[1],
            schema_name=table.split(".")[0],
            columns=columns.split(", "),
            records=[(i, payload, *([i] * len(keys))) for i in inserted],
        )
    updated = list(_share(t.updated, lot, lots))
    if updated:
        await conn.execute(
            f"UPDATE {table} SET payload = payload WHERE id = ANY($1::bigint[])", updated
        )
    deleted = list(_share(t.deleted, lot, lots))
    if deleted:
        await conn.execute(f"DELETE FROM {table} WHERE id = ANY($1::bigint[])", deleted)


def consumers_per_topic(target: StackTarget) -> dict[str, int]:
    """Physical topic -> how many of the stack's services consume it (each in its group)."""
    from omni_common.service import describe_service

    counts: dict[str, int] = {}
    for service in target.pids:
        if service in ("kafka", "postgres"):
            continue
        try:
            description = describe_service(service)
        except KeyError:
            continue
        for topic in description.consumes:
            physical = f"{target.topic_prefix}{topic}"
            counts[physical] = counts.get(physical, 0) + 1
        for topic in description.produces:
            counts.setdefault(f"{target.topic_prefix}{topic}", 0)
    return counts


@bench_app.command("floor")
def floor(
    checkouts: Annotated[int, typer.Option(min=1, help="Checkouts whose work is replayed")] = 1000,
    skus: Annotated[int, typer.Option(min=1, help="SKUs the checkouts spread over")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line")] = False,
) -> None:
    """The CPU a checkout's work costs the broker and PostgreSQL without the platform: runs
    checkouts through the dev stack to learn that work, then replays it the cheapest way."""
    from omni_devkit.bench.checkout import SERVICES, measure

    say = progress(as_json)
    result = run_on_stack(
        SERVICES,
        lambda target: measure(target, checkouts=checkouts, skus=skus, say=say, floor=True),
        embedded=False,
        say=say,
    )
    if result.floor is None:
        raise DevStackError("no floor measured")
    figures = {
        "checkouts": checkouts,
        "floor_cpu_ms_per_checkout": result.floor.as_json(),
        "work_per_checkout": result.work,
    }
    if as_json:
        typer.echo(json.dumps(figures))
        return
    f = figures["floor_cpu_ms_per_checkout"]
    typer.echo(
        f"floor: {f['total']} ms of CPU per checkout without the platform"
        f" (broker {f['kafka']}, PostgreSQL {f['postgres']}, clients {f['client']});"
        f" work per checkout: {result.work}"
    )
