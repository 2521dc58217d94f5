"""Finding personal data left in a service's tables (for erasure tests)."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg


async def tables_containing(
    conn: asyncpg.Connection, schema: str, needles: Iterable[str]
) -> dict[str, str]:
    """Tables of ``schema`` with a row whose text holds one of ``needles``: table -> needle.

    Every column is searched as text; ``bytea`` payloads (the outbox) are decoded as UTF-8
    first, since their text form is hex.
    """
    wanted = [n for n in needles if n]
    found: dict[str, str] = {}
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
        schema,
    )
    for t in tables:
        name = t["table_name"]
        columns = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = $2",
            schema,
            name,
        )
        parts = [
            f"coalesce(convert_from(\"{c['column_name']}\", 'UTF8'), '')"
            if c["data_type"] == "bytea"
            else f"coalesce(\"{c['column_name']}\"::text, '')"
            for c in columns
        ]
        if not parts:
            continue
        rows = await conn.fetch(
            f'SELECT concat_ws(\' \', {", ".join(parts)}) AS row FROM "{schema}"."{name}"'
        )
        for row in rows:
            hit = next((n for n in wanted if n in row["row"]), None)
            if hit is not None:
                found[name] = hit
                break
    return found
