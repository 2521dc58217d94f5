"""``omni bench carts``: open carts reaching their abandonment deadline, at scale.

Two phases on one broker and database, one after the other:

1. **baseline**: the platform's timer wheel (``omni_common.timers``) with an empty handler,
   in this process, over the same number of timers and the same deadline window; its lag is
   deadline -> handler called;
2. **service**: the customer-profile service as its own process (``omni run``), its schema
   seeded with open carts of known shoppers and their armed timers (deadlines spread over
   the window); the lag is deadline -> ``cart.abandoned`` received by a consumer, so it
   includes the decision, the outbox relay and the broker.

Seeding goes straight into the service's tables (as many carts as its consumers would take
hours to build); what is measured is the path from an armed timer to the announcement. The
kind of timer to seed is not taken from the service's code: one probe cart goes in through
``cart.events.v1`` as a web site would send it, and its seeded twins copy the timer the
service armed for it.
Printed: p50/p99/max lag and rate of both phases, the service's peak RSS and the schema's
size. Uses ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` when both are set, else an
embedded broker (the one the dev stack chooses) and PostgreSQL of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

import asyncpg
import httpx
import typer
from aiokafka import AIOKafkaConsumer, TopicPartition
from omni_common.db import create_pool, migrate, quote_ident
from omni_common.handlers import Due
from omni_common.metrics import PlatformMetrics
from omni_common.settings import ServiceSettings
from omni_common.timers import TimerWheel
from omni_common.topics import create_topics
from omni_contracts import CART_ABANDONED, CartItemAdded, Channel, Line, Money
from omni_contracts.envelope import header_map

from omni_devkit.bench.kit import infrastructure, percentile
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.process import DevStackError, free_port
from omni_devkit.testing.events import ChannelPublisher

BASELINE_KIND = "bench-empty"
CHUNK = 20_000
# What the seeded timers carry, as the service arms them for a cart (checked on the probe's).
SEEDED_PAYLOAD_KEYS = {"due_at"}


@dataclass
class Phase:
    """Lags (seconds after the deadline) of one phase and when it ran."""

    lags: list[float]
    expected: int
    first_due: float
    last_seen: float

    def figures(self) -> dict[str, Any]:
        """p50, p99, max lag (ms), rate (per second) and how many were seen."""
        ordered = sorted(self.lags)

        def pct(q: float) -> float:
            if not ordered:
                return float("nan")
            return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 1)

        span = max(self.last_seen - self.first_due, 1e-9)
        return {
            "seen": len(ordered),
            "expected": self.expected,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
            "within_1s": round(sum(1 for lag in ordered if lag <= 1.0) / max(len(ordered), 1), 4),
            "rate_per_s": round(len(ordered) / span, 1),
        }


async def _seed_timers(
    conn: asyncpg.Connection, kind: str, n: int, t0: datetime, window_s: float, carts: bool
) -> None:
    """Arm ``n`` timers due evenly over ``window_s`` from ``t0`` (with carts and shoppers)."""
    step = window_s / n
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK) - 1
        async with conn.transaction():
            if carts:
                await conn.execute(
                    "INSERT INTO profiles (customer_id, created_at)"
                    " SELECT 'bench-c-' || g, now() FROM generate_series($1::int, $2::int) g",
                    lo,
                    hi,
                )
                await conn.execute(
                    "INSERT INTO carts (cart_id, customer_id, channel, status, items, skus, value,"
                    " currency, contents_hash, last_activity_at)"
                    " SELECT 'bench-' || g, 'bench-c-' || g, 'web', 'open',"
                    ' \'[{"sku": "SKU-1", "qty": 1, "unit_price": "10.00", "currency": "EUR"}]\','
                    " '{SKU-1}', 10.00, 'EUR', 'bench',"
                    " $3::timestamptz + make_interval(secs => g * $4::float8) - $5::interval"
                    " FROM generate_series($1::int, $2::int) g",
                    lo,
                    hi,
                    t0,
                    step,
                    timedelta(hours=1),
                )
            await conn.execute(
                "INSERT INTO timers (kind, key, due_at, payload)"
                " SELECT $5, 'bench-' || g, d, jsonb_build_object('due_at', d)"
                " FROM (SELECT g, $3::timestamptz + make_interval(secs => g * $4::float8) AS d"
                "       FROM generate_series($1::int, $2::int) g) s",
                lo,
                hi,
                t0,
                step,
                kind,
            )


async def _schema_size(conn: asyncpg.Connection, schema: str) -> int:
    size: int = await conn.fetchval(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
        schema,
    )
    return size


async def _baseline(database: str, n: int, window_s: float, lead_s: float, say: Any) -> Phase:
    """The timer wheel with an empty handler over ``n`` timers."""
    schema = f"bench_wheel_{uuid.uuid4().hex[:6]}"
    settings = ServiceSettings(service_name="bench-wheel", database_url=database, db_schema=schema)
    await migrate(settings)
    pool = await create_pool(settings)
    lags: list[float] = []
    seen_at = [0.0]
    all_fired = asyncio.Event()

    async def empty(due: list[Due], _tx: Any) -> None:
        now = time.time()
        for timer in due:
            lags.append(now - datetime.fromisoformat(timer.payload["due_at"]).timestamp())
        seen_at[0] = now
        if len(lags) >= n:
            all_fired.set()

    async def healthy() -> None:
        return None

    @contextlib.asynccontextmanager
    async def transaction() -> Any:
        async with pool.acquire() as conn, conn.transaction():
            yield _Conn(conn)

    try:
        t0 = datetime.now(UTC) + timedelta(seconds=lead_s)
        say(f"baseline: arming {n} timers over {window_s:g} s ...")
        async with pool.acquire() as conn:
            await _seed_timers(conn, BASELINE_KIND, n, t0, window_s, carts=False)
        # The service's wheel settings, so only the handler differs.
        from customer_profile_service.settings import ProfileSettings

        config = ProfileSettings()
        wheel = TimerWheel(
            transaction,
            {BASELINE_KIND: empty},
            metrics=PlatformMetrics("bench-wheel"),
            health=healthy,
            poll_interval_s=0.1,
            batch_size=config.cart_timer_batch,
            per_transaction=config.cart_timer_per_transaction,
            concurrency=config.cart_timer_concurrency,
        )
        async with wheel.running():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_fired.wait(), lead_s + window_s + 120)
        return Phase(lags, n, t0.timestamp(), seen_at[0])
    finally:
        await pool.execute(f"DROP SCHEMA {quote_ident(settings.schema)} CASCADE")
        await pool.close()


class _Conn:
    """The shape a timer handler's transaction has (``tx.conn``, ``tx.origin``)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.origin: str | None = None


async def _probe_timer_kind(conn: asyncpg.Connection, bootstrap: str, prefix: str, run: str) -> str:
    """The kind of timer the service arms for a cart, learnt from one probe cart sent on
    ``cart.events.v1`` as a web site sends it (its deadline is an hour away)."""
    cart_id = f"probe-{run}"
    sku = "SKU-1"
    price = Money(amount=Decimal("10.00"), currency="EUR")
    async with ChannelPublisher(bootstrap, prefix, source="/channels/bench") as channel:
        await channel.publish(
            CartItemAdded(
                cart_id=cart_id,
                channel=Channel.WEB,
                customer_id=f"probe-c-{run}",
                items=[Line(sku=sku, qty=1, unit_price=price)],
                sku=sku,
                occurred_at=datetime.now(UTC),
            )
        )
    deadline = time.monotonic() + 60
    query = "SELECT kind, payload FROM timers WHERE key = $1"
    while (row := await conn.fetchrow(query, cart_id)) is None:
        if time.monotonic() > deadline:
            raise DevStackError("customer-profile armed no timer for the probe cart in 60 s")
        await asyncio.sleep(0.1)
    payload = row["payload"]
    keys = set(json.loads(payload) if isinstance(payload, str) else payload)
    if keys != SEEDED_PAYLOAD_KEYS:
        raise DevStackError(
            f"customer-profile arms cart timers carrying {sorted(keys)}; the bench seeds"
            f" {sorted(SEEDED_PAYLOAD_KEYS)}: teach _seed_timers the new shape"
        )
    return str(row["kind"])


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of a process in KiB (0 when unknown)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


async def _service_phase(
    bootstrap: str, database: str, n: int, window_s: float, lead_s: float, say: Any
) -> tuple[Phase, dict[str, Any]]:
    """Seed the service's carts, run it as a process, read its announcements."""
    from omni_devkit.devstack.kafka import delete_topics
    from omni_devkit.devstack.postgres import create_database, drop_database

    run = uuid.uuid4().hex[:8]
    prefix = f"benchcarts{run}."
    created = await create_topics(bootstrap, prefix=prefix)
    db_url = await create_database(database, f"benchcarts{run}")
    port = free_port()
    delay = timedelta(hours=1)
    env = dict(os.environ) | {
        "SERVICE_NAME": "customer-profile",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": db_url,
        "TOPIC_PREFIX": prefix,
        "HTTP_PORT": str(port),
        "METRICS_PORT": "0",  # whichever is free: nothing scrapes it here
        "CART_ABANDONMENT_DELAY": str(delay.total_seconds()),
        "CART_TIMER_POLL_S": "0.1",
        "LOG_LEVEL": "WARNING",
        # Only the probe cart reaches the service's inputs: Kafka's default fetch wait instead
        # of the 5 ms that buys consumer latency on Tansu with a busy poll.
        "CONSUMER_FETCH_MAX_WAIT_MS": "500",
        "API_KEYS": "bench:bench-carts-key:admin",
    }
    env.pop("DB_SCHEMA", None)
    log = tempfile.NamedTemporaryFile(prefix="omni-bench-carts-", suffix=".log", delete=False)  # noqa: SIM115
    say(f"service: starting customer-profile (log {log.name}) ...")
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; started once per run
        [sys.executable, "-m", "omni_devkit.cli", "run", "customer-profile"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=50)
    peak_rss = 0
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            started = time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise DevStackError(
                        f"customer-profile exited ({proc.returncode}); see {log.name}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() - started > 120:
                    raise DevStackError(f"customer-profile not ready in 120 s; see {log.name}")
                await asyncio.sleep(0.2)
        topic = prefix + CART_ABANDONED
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic) or set()
        while not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning(*consumer.assignment())

        conn = await asyncpg.connect(db_url, server_settings={"search_path": "customer_profile"})
        try:
            say("service: one probe cart through cart.events.v1, for the kind of timer ...")
            kind = await _probe_timer_kind(conn, bootstrap, prefix, run)
            t0 = datetime.now(UTC) + timedelta(seconds=lead_s)
            say(f"service: seeding {n} open carts due over {window_s:g} s ...")
            seeding = time.monotonic()
            await _seed_timers(conn, kind, n, t0, window_s, carts=True)
            say(f"service: seeded in {time.monotonic() - seeding:.1f} s; waiting for abandonments")
            size_seeded = await _schema_size(conn, "customer_profile")
            lags: list[float] = []
            split_written: list[float] = []
            split_relayed: list[float] = []
            last_seen = 0.0
            deadline = t0.timestamp() + window_s + 120
            while len(lags) < n and time.time() < deadline:
                batches = await consumer.getmany(timeout_ms=200)
                now = time.time()
                for records in batches.values():
                    for record in records:
                        body = json.loads(record.value)
                        if not body["cart_id"].startswith("bench-"):
                            continue  # the probe, should a long window reach its deadline
                        last = datetime.fromisoformat(body["last_activity_at"])
                        due = (last + delay).timestamp()
                        lags.append(now - due)
                        last_seen = now
                        # Where the time goes: deadline -> written (the event's time),
                        # written -> published (the record's broker timestamp).
                        written = datetime.fromisoformat(
                            header_map(record.headers or ())["ce_time"]
                        ).timestamp()
                        split_written.append(written - due)
                        split_relayed.append(record.timestamp / 1000 - written)
                peak_rss = max(peak_rss, _rss_kib(proc.pid)[1])
            size_end = await _schema_size(conn, "customer_profile")
        finally:
            await conn.close()
        rss_now, rss_peak = _rss_kib(proc.pid)
        extra = {
            "service_rss_mib": round(rss_now / 1024, 1),
            "service_peak_rss_mib": round(max(peak_rss, rss_peak) / 1024, 1),
            "schema_mib_seeded": round(size_seeded / 2**20, 1),
            "schema_mib_end": round(size_end / 2**20, 1),
            "written_p99_ms": round(percentile(split_written, 0.99) * 1000, 1),
            "relayed_p99_ms": round(percentile(split_relayed, 0.99) * 1000, 1),
        }
        return Phase(lags, n, t0.timestamp(), last_seen), extra
    finally:
        await consumer.stop()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        # The broker and database may be the environment's (KAFKA_BOOTSTRAP_SERVERS,
        # DATABASE_URL): leave no database or topics of this run behind.
        with contextlib.suppress(Exception):
            await drop_database(database, f"benchcarts{run}")
        await delete_topics(bootstrap, created)


async def measure(
    bootstrap: str, database: str, *, carts: int, window_s: float, lead_s: float, say: Any
) -> dict[str, Any]:
    """Both phases; the figures as one dict."""
    baseline = await _baseline(database, carts, window_s, lead_s, say)
    service, extra = await _service_phase(bootstrap, database, carts, window_s, lead_s, say)
    return {
        "carts": carts,
        "window_s": window_s,
        "needed_rate_per_s": round(carts / window_s, 1),
        "service": service.figures(),
        "baseline": baseline.figures(),
        **extra,
    }


@bench_app.command("carts")
def bench_carts(
    carts: Annotated[int, typer.Option(min=10, help="Open carts (and timers)")] = 20_000,
    window: Annotated[float, typer.Option(min=1, help="Seconds the deadlines spread over")] = 60.0,
    lead: Annotated[
        float | None, typer.Option(help="Seconds from seeding to the first deadline")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line")] = False,
) -> None:
    """Cart abandonment lag after the deadline, beside the timer wheel with an empty handler.

    The issue's scale: ``--carts 1000000 --window 600``.
    """

    def say(line: str) -> None:
        if not as_json:
            typer.echo(line, err=True)

    # Seeding runs ahead of the deadlines: give it time in proportion to the carts.
    lead_s = lead if lead is not None else 5 + carts / 25_000
    try:
        with infrastructure(say, name="carts") as (bootstrap, database):
            figures = asyncio.run(
                measure(bootstrap, database, carts=carts, window_s=window, lead_s=lead_s, say=say)
            )
    except (DevStackError, OSError) as exc:
        fail(f"bench carts: {exc}")
    if as_json:
        typer.echo(json.dumps(figures))
        return
    s, b = figures["service"], figures["baseline"]
    typer.echo(
        f"{carts} carts due over {window:g} s (needs {figures['needed_rate_per_s']}/s):\n"
        f"  service : {s['seen']}/{s['expected']} abandoned, lag p50 {s['p50_ms']} ms,"
        f" p99 {s['p99_ms']} ms, max {s['max_ms']} ms, {s['within_1s']:.2%} within 1 s,"
        f" {s['rate_per_s']}/s\n"
        f"  baseline: {b['seen']}/{b['expected']} fired (empty handler), lag p50"
        f" {b['p50_ms']} ms, p99 {b['p99_ms']} ms, max {b['max_ms']} ms, {b['rate_per_s']}/s\n"
        f"  service RSS {figures['service_rss_mib']} MiB (peak"
        f" {figures['service_peak_rss_mib']} MiB); schema {figures['schema_mib_seeded']} MiB"
        f" seeded, {figures['schema_mib_end']} MiB at the end\n"
        f"  service p99: deadline -> written {figures['written_p99_ms']} ms,"
        f" written -> published {figures['relayed_p99_ms']} ms"
    )
