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


def quote_ident(name: str) -> str:
    """Quote a SQL identifier (schema names come from settings, never from users)."""
    return '"' + name.replace('"', '""') + '"'


async def create_pool(settings: ServiceSettings) -> asyncpg.Pool:
    """A connection pool whose ``search_path`` is the service's schema."""
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        server_settings={
            "search_path": f"{quote_ident(settings.schema)},public",
            "application_name": settings.service_name,
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
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"migrate:{schema}")
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
