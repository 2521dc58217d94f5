"""Fault injection for the chaos scenarios (tests/chaos): a database that refuses, figures.

Every scenario runs against the real broker and PostgreSQL of the test session and ends by
printing what it sent, applied, saw twice and dead-lettered, and how long recovery took.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from omni_common.db import quote_ident
from omni_common.handlers import Lot, Subscription
from omni_common.service import ServiceRuntime, Tx
from omni_contracts import AvailabilityChanged, StockAdjusted


@dataclass
class Figures:
    """What a scenario measured; printed at its end and checked by its assertions."""

    scenario: str
    sent: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    recovered_s: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def report(self) -> str:
        """One line for the test output (run pytest with ``-s`` to see it live)."""
        recovered = "n/a" if self.recovered_s is None else f"{self.recovered_s:.2f}s"
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        line = (
            f"[chaos] {self.scenario}: sent={self.sent} applied={self.applied}"
            f" duplicates={self.duplicates} dlq={self.dead_lettered}"
            f" time_to_recover={recovered}{extra}"
        )
        print(line)
        return line


@contextlib.asynccontextmanager
async def database_refusing(server_url: str, database: str) -> AsyncIterator[None]:
    """The database refuses every new connection and loses its open ones, until exit.

    ``ALLOW_CONNECTIONS false`` answers "database ... is not currently accepting
    connections", as a database being restarted or failed over does.
    """
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"ALTER DATABASE {quote_ident(database)} ALLOW_CONNECTIONS false")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        yield
    finally:
        await admin.execute(f"ALTER DATABASE {quote_ident(database)} ALLOW_CONNECTIONS true")
        await admin.close()


async def wait_for(predicate, timeout: float = 30.0, every: float = 0.1) -> float:  # noqa: ASYNC109
    """Poll an async predicate until truthy; returns the seconds it took."""
    start = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


# -- a stand-in service for the scenarios --------------------------------------------------


FaultHook = Callable[[StockAdjusted, int], Awaitable[None]]
"""``async (event, attempt) -> None``: raise to inject a fault (attempt counts from 1)."""


class EffectCounter:
    """A stand-in service: each stock adjustment writes one effect row and one event.

    The effect table has no unique key, so a second effect of one event would show as a
    duplicate instead of an error: the inbox alone must keep it out. ``fault`` runs inside
    the handler's transaction, after the effect is written and before the commit.
    """

    TOPIC = "inventory.adjustments.v1"

    def __init__(
        self, runtime: ServiceRuntime, fault: FaultHook | None = None, delay_s: float = 0.0
    ) -> None:
        self.runtime = runtime
        self.fault = fault
        self.delay_s = delay_s
        self.calls: Counter[str] = Counter()
        runtime.subscribe(Subscription(self.TOPIC, {StockAdjusted: self.on_adjusted}))
        runtime.publishes("inventory.availability.v1")

    async def on_adjusted(self, adjustments: Lot[StockAdjusted], tx: Tx) -> None:
        """Write the effect and tell the new availability, in the runtime's transaction."""
        for event, envelope in adjustments:
            self.calls[event.adjustment_id] += 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            await tx.conn.execute(
                "INSERT INTO effects (adjustment_id, sku) VALUES ($1, $2)",
                event.adjustment_id,
                event.sku,
            )
            if self.fault is not None:
                await self.fault(event, self.calls[event.adjustment_id])
            await tx.emit(
                AvailabilityChanged(
                    sku=event.sku,
                    location_id=event.location_id,
                    on_hand=event.delta or 0,
                    reserved=0,
                    available=event.delta or 0,
                    status="in_stock",
                    previous_status="out_of_stock",
                    online_available=event.delta or 0,
                    cause="adjustment",
                    changed_at=event.occurred_at,
                ),
                caused_by=envelope,
            )

    async def start(self) -> EffectCounter:
        """Start the service and create its effect table."""
        await self.runtime.start()
        async with self.runtime.transaction() as tx:
            await tx.conn.execute(
                "CREATE TABLE IF NOT EXISTS effects ("
                " id bigserial PRIMARY KEY, adjustment_id text NOT NULL, sku text NOT NULL)"
            )
        return self

    async def effects(self) -> tuple[int, int]:
        """(distinct events applied, duplicate effects)."""
        row = await self.runtime.pool.fetchrow(
            "SELECT count(DISTINCT adjustment_id) AS applied,"
            " count(*) - count(DISTINCT adjustment_id) AS duplicates FROM effects"
        )
        assert row is not None
        return int(row["applied"]), int(row["duplicates"])


def adjustment(sku: str, delta: int = 1) -> StockAdjusted:
    """A receipt of ``delta`` units of ``sku`` at store-1."""
    return StockAdjusted(
        adjustment_id=f"adj-{uuid.uuid4().hex}",
        location_id="store-1",
        sku=sku,
        kind="receipt",
        delta=delta,
        occurred_at=datetime.now(UTC),
    )
