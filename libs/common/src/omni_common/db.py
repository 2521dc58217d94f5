"""PostgreSQL access: an asyncpg pool per service, scoped to the service's own schema,
and a migrations runner for plain SQL files."""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

from omni_common.settings import ServiceSettings

log = logging.getLogger(__name__)

# Outbox and inbox tables, created in every service's schema before its own migrations.
COMMON_MIGRATIONS_PACKAGE = "omni_common.migrations"


def advisory_key_sql(param: str) -> str:
    """The SQL for the advisory lock key of a lock name given as ``param`` (e.g. ``$1``).

    Every advisory lock of the platform is ``hashtextextended(name, 0)``: 64-bit, where
    ``hashtext`` gave 32 bits, and ``name`` is namespaced (``omni.outbox-relay:<schema>``,
    ``omni.migrate:<schema>``, ``order.idempotency:<key>``, ``inventory.sku:<sku>``), so an
    idempotency key can never take the relay's leadership lock (services share a database).
    """
    return f"hashtextextended({param}, 0)"


def session_settings(
    *,
    statement_timeout_ms: int | None = None,
    lock_timeout_ms: int | None = None,
    idle_in_transaction_timeout_ms: int | None = None,
) -> dict[str, str]:
    """Server settings that bound every session: no statement, lock wait or abandoned
    transaction lasts forever, and a dead peer is noticed within seconds (TCP keepalives)."""
    settings = {
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
    }
    if statement_timeout_ms is not None:
        settings["statement_timeout"] = str(statement_timeout_ms)
    if lock_timeout_ms is not None:
        settings["lock_timeout"] = str(lock_timeout_ms)
    if idle_in_transaction_timeout_ms is not None:
        settings["idle_in_transaction_session_timeout"] = str(idle_in_transaction_timeout_ms)
    return settings


def quote_ident(name: str) -> str:
    """Quote a SQL identifier (schema names come from settings, never from users)."""
    return '"' + name.replace('"', '""') + '"'


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a pooled connection as it is (asyncpg still rolls back an open transaction).

    Pooled sessions never change session state: advisory locks are transaction-level
    (``pg_advisory_xact_lock``), nothing runs ``SET`` or ``LISTEN`` (the relay and the
    migrations use connections of their own). asyncpg's default reset (``RESET ALL``,
    ``UNLISTEN *``, ``pg_advisory_unlock_all()``) would cost a round trip per transaction.
    """


async def create_pool(settings: ServiceSettings) -> asyncpg.Pool:
    """A connection pool whose ``search_path`` is the service's schema.

    Statements, lock waits and transactions left open are bounded by the server (a timeout
    is an infrastructure error: the message waits and is retried, never dead-lettered).
    """
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_connect_timeout_s,
        reset=_keep_session,
        server_settings={
            "search_path": f"{quote_ident(settings.schema)},public",
            "application_name": settings.service_name,
            **session_settings(
                statement_timeout_ms=settings.db_statement_timeout_ms,
                lock_timeout_ms=settings.db_lock_timeout_ms,
                idle_in_transaction_timeout_ms=settings.db_idle_in_transaction_timeout_ms,
            ),
        },
    )
    assert pool is not None
    return pool


def _sql_files(package: str) -> list[tuple[str, str]]:
    root = resources.files(package)
    files = sorted(
        (entry.name, entry.read_text()) for entry in root.iterdir() if entry.name.endswith(".sql")
    )
    return files


async def migrate(settings: ServiceSettings, migrations_package: str | None = None) -> list[str]:
    """Apply the pending SQL migrations of one service to its schema; returns what ran.

    Files run in name order, each in its own transaction, recorded in
    ``schema_migrations``. An advisory lock serialises instances starting together.
    """
    applied: list[str] = []
    schema = settings.schema
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        await conn.execute(
            f"SELECT pg_advisory_lock({advisory_key_sql('$1')})", f"omni.migrate:{schema}"
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await conn.execute(f"SET search_path TO {quote_ident(schema)}, public")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        packages = [COMMON_MIGRATIONS_PACKAGE]
        if migrations_package:
            packages.append(migrations_package)
        for package in packages:
            prefix = "common/" if package == COMMON_MIGRATIONS_PACKAGE else ""
            for name, sql in _sql_files(package):
                key = prefix + name
                if key in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", key)
                applied.append(key)
                log.info("applied migration %s to schema %s", key, schema)
    finally:
        await conn.close()
    return applied
