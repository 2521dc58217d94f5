"""The inbox: idempotent consumption by ``ce_id``, in the handler's own transaction."""

from __future__ import annotations

import asyncpg
from omni_contracts.envelope import Envelope


async def first_delivery(conn: asyncpg.Connection, consumer: str, envelope: Envelope) -> bool:
    """Record the event as handled by ``consumer``; False when it was handled before.

    Call inside the transaction that applies the event's effect: if that transaction rolls
    back, the record goes with it and a redelivery is handled again.
    """
    inserted = await conn.fetchval(
        "INSERT INTO inbox (consumer, ce_id, ce_type) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING RETURNING true",
        consumer,
        envelope.id,
        envelope.type,
    )
    return bool(inserted)
