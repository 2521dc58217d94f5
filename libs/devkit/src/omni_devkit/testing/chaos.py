"""Fault injection for the chaos scenarios (tests/chaos): a database that refuses, figures.

Every scenario runs against the real broker and PostgreSQL of the test session and ends by
printing what it sent, applied, saw twice and dead-lettered, and how long recovery took.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
from omni_common.db import quote_ident


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
