"""Profiles, identities, purchases and carts in PostgreSQL.

Runs on the connection of the caller's transaction (``tx.conn``, search_path = the
customer-profile schema), so state, inbox record, timers and outbox rows commit together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from customer_profile_service.adapters.cart_tables import CartRow, CartTables, lines_json
from customer_profile_service.domain import CartLine, IdKind

__all__ = ["CartRow", "HistoryCursor", "ProfileRepository", "ProfileRow"]

# The contact and preference columns a merge carries over and a snapshot shows.
_PROFILE_COLUMNS = (
    "customer_id, created_at, updated_at, version, merged_into, email, phone, loyalty_card,"
    " first_name, last_name, push_tokens, push_subscriptions, preferences, preferred_store, tier,"
    " facts"
)


@dataclass
class ProfileRow:
    """A profile as stored."""

    customer_id: str
    created_at: datetime
    updated_at: datetime
    version: int
    merged_into: str | None
    email: str | None
    phone: str | None
    loyalty_card: str | None
    first_name: str | None
    last_name: str | None
    push_tokens: list[str]
    push_subscriptions: list[dict[str, Any]]
    preferences: dict[str, Any]
    preferred_store: str | None
    tier: str | None
    # What each signal said, per origin (see domain/facts.py): the fields above derive from it.
    facts: dict[str, Any]

    @classmethod
    def of(cls, row: asyncpg.Record) -> ProfileRow:
        """From a ``profiles`` row."""
        values = dict(row)
        values["push_tokens"] = list(values["push_tokens"] or [])
        values["push_subscriptions"] = json.loads(values["push_subscriptions"])
        values["preferences"] = json.loads(values["preferences"])
        values["facts"] = json.loads(values["facts"])
        return cls(**values)


@dataclass(frozen=True)
class HistoryCursor:
    """Where a page of history ended (exclusive): newest first by (placed_at, key)."""

    placed_at: datetime
    purchase_key: str


class ProfileRepository(CartTables):
    """The customer-profile tables, on one transaction's connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    # -- serialising concurrent handlers ----------------------------------------------------

    async def lock(self, namespace: str, what: str) -> None:
        """Serialise this transaction with others on ``what`` (a cart, a device) until commit.

        Events about one cart or device arrive on different topics and are handled at the
        same time; without this, each would miss the other's uncommitted rows.
        """
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{namespace}:{what}")

    # -- profiles -------------------------------------------------------------------------

    async def profile(self, customer_id: str, *, for_update: bool = False) -> ProfileRow | None:
        """A profile row (merged ones included), locked if asked."""
        lock = " FOR UPDATE" if for_update else ""
        row = await self.conn.fetchrow(
            f"SELECT {_PROFILE_COLUMNS} FROM profiles WHERE customer_id = $1{lock}", customer_id
        )
        return ProfileRow.of(row) if row else None

    async def create_profile(self, customer_id: str, at: datetime) -> bool:
        """Create an empty profile; False when it existed already.

        An existing profile takes the earlier ``at`` as its start: signals arrive in any
        order, and the oldest profile is the one a merge keeps.
        """
        return bool(
            await self.conn.fetchval(
                "INSERT INTO profiles (customer_id, created_at) VALUES ($1, $2)"
                " ON CONFLICT (customer_id) DO UPDATE SET created_at = EXCLUDED.created_at"
                " WHERE profiles.created_at > EXCLUDED.created_at RETURNING xmax = 0",
                customer_id,
                at,
            )
        )

    async def is_erased(self, customer_id: str) -> bool:
        """Whether the shopper asked to be forgotten."""
        return bool(
            await self.conn.fetchval(
                "SELECT true FROM erasures WHERE customer_id = $1", customer_id
            )
        )

    async def save_contact(self, p: ProfileRow) -> None:
        """Write the contact, preference and store fields of ``p``."""
        await self.conn.execute(
            "UPDATE profiles SET email = $2, phone = $3, loyalty_card = $4, first_name = $5,"
            " last_name = $6, push_tokens = $7, push_subscriptions = $8::jsonb,"
            " preferences = $9::jsonb, preferred_store = $10, facts = $11::jsonb,"
            " updated_at = now() WHERE customer_id = $1",
            p.customer_id,
            p.email,
            p.phone,
            p.loyalty_card,
            p.first_name,
            p.last_name,
            p.push_tokens,
            json.dumps(p.push_subscriptions),
            json.dumps(p.preferences),
            p.preferred_store,
            json.dumps(p.facts),
        )

    async def mark_merged(self, merged_id: str, surviving_id: str) -> None:
        """``merged_id`` now lives on in ``surviving_id``: keep only the redirect."""
        await self.conn.execute(
            "UPDATE profiles SET merged_into = $2 WHERE merged_into = $1", merged_id, surviving_id
        )
        await self.conn.execute(
            "UPDATE profiles SET merged_into = $2, email = NULL, phone = NULL,"
            " loyalty_card = NULL, first_name = NULL, last_name = NULL, push_tokens = '{}',"
            " push_subscriptions = '[]', preferences = '{}', preferred_store = NULL,"
            " facts = DEFAULT, updated_at = now() WHERE customer_id = $1",
            merged_id,
            surviving_id,
        )
        for table in ("identities", "purchases", "carts"):
            # origin_id remembers whose the row was: what an unmerge moves back.
            await self.conn.execute(
                f"UPDATE {table} SET origin_id = coalesce(origin_id, customer_id),"
                " customer_id = $2 WHERE customer_id = $1",
                merged_id,
                surviving_id,
            )

    async def restore(self, surviving_id: str, restored_id: str, origins: Sequence[str]) -> None:
        """Undo a merge: ``restored_id`` lives again with the rows of ``origins``."""
        others = [o for o in origins if o != restored_id]
        await self.conn.execute(
            "UPDATE profiles SET merged_into = NULL, updated_at = now() WHERE customer_id = $1",
            restored_id,
        )
        await self.conn.execute(
            "UPDATE profiles SET merged_into = $1 WHERE customer_id = ANY($2::text[])",
            restored_id,
            others,
        )
        for table in ("identities", "purchases", "carts"):
            await self.conn.execute(
                f"UPDATE {table} SET customer_id = $2 WHERE customer_id = $1"
                " AND origin_id = ANY($3::text[])",
                surviving_id,
                restored_id,
                list(origins),
            )

    async def log_identity(
        self, customer_id: str, other_id: str, action: str, proof: str, detail: str | None
    ) -> None:
        """Keep a merge or unmerge in the identity log."""
        await self.conn.execute(
            "INSERT INTO identity_log (customer_id, other_id, action, proof, detail)"
            " VALUES ($1, $2, $3, $4, $5)",
            customer_id,
            other_id,
            action,
            proof,
            detail,
        )

    async def identity_log(self, customer_ids: Sequence[str], limit: int) -> list[asyncpg.Record]:
        """The merges and unmerges these profiles took part in, newest first."""
        return list(
            await self.conn.fetch(
                "SELECT customer_id, other_id, action, proof, detail, at FROM identity_log"
                " WHERE customer_id = ANY($1::text[]) OR other_id = ANY($1::text[])"
                " ORDER BY id DESC LIMIT $2",
                list(customer_ids),
                limit,
            )
        )

    async def group_of(self, customer_id: str) -> list[str]:
        """A profile and every profile merged into it."""
        rows = await self.conn.fetch(
            "SELECT customer_id FROM profiles WHERE customer_id = $1 OR merged_into = $1",
            customer_id,
        )
        return [r["customer_id"] for r in rows]

    async def preferred_store(self, customer_id: str) -> str | None:
        """The store a shopper buys at most (ties: the most recent)."""
        value: str | None = await self.conn.fetchval(
            "SELECT location_id FROM purchases WHERE customer_id = $1 AND location_id IS NOT NULL"
            " GROUP BY location_id ORDER BY count(*) DESC, max(placed_at) DESC LIMIT 1",
            customer_id,
        )
        return value

    # -- identities -----------------------------------------------------------------------

    async def owner(self, kind: IdKind, value: str) -> str | None:
        """The profile holding an identifier, if any."""
        owner: str | None = await self.conn.fetchval(
            "SELECT customer_id FROM identities WHERE kind = $1 AND value = $2", kind.value, value
        )
        return owner

    async def identifier_counts(self, customer_id: str) -> dict[IdKind, int]:
        """How many identifiers of each kind a profile holds."""
        rows = await self.conn.fetch(
            "SELECT kind, count(*) AS n FROM identities WHERE customer_id = $1 GROUP BY kind",
            customer_id,
        )
        return {IdKind(r["kind"]): r["n"] for r in rows}

    async def identifiers(self, customer_id: str) -> dict[IdKind, list[str]]:
        """Every identifier of a profile, per kind, oldest first."""
        rows = await self.conn.fetch(
            "SELECT kind, value FROM identities WHERE customer_id = $1 ORDER BY first_seen, value",
            customer_id,
        )
        found: dict[IdKind, list[str]] = {kind: [] for kind in IdKind}
        for r in rows:
            found[IdKind(r["kind"])].append(r["value"])
        return found

    async def add_identifier(
        self, kind: IdKind, value: str, customer_id: str, origin_id: str | None = None
    ) -> bool:
        """Give ``customer_id`` an identifier nobody holds; False if someone took it first.

        ``origin_id``: the customer id whose signal presented it (what an unmerge keeps).
        """
        return bool(
            await self.conn.fetchval(
                "INSERT INTO identities (kind, value, customer_id, origin_id)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
                kind.value,
                value,
                customer_id,
                origin_id or customer_id,
            )
        )

    async def release_others(
        self, kind: IdKind, customer_id: str, origin_id: str, keep: Sequence[str]
    ) -> None:
        """``origin_id`` no longer uses its identifiers of ``kind`` except ``keep``."""
        await self.conn.execute(
            "DELETE FROM identities WHERE kind = $1 AND customer_id = $2"
            " AND coalesce(origin_id, customer_id) = $3 AND NOT value = ANY($4::text[])",
            kind.value,
            customer_id,
            origin_id,
            list(keep),
        )

    async def release_identifier(self, kind: IdKind, value: str, customer_id: str) -> None:
        """The shopper no longer uses this identifier (a changed or removed contact)."""
        await self.conn.execute(
            "DELETE FROM identities WHERE kind = $1 AND value = $2 AND customer_id = $3",
            kind.value,
            value,
            customer_id,
        )

    async def record_skip(
        self, kind: IdKind, value: str, customer_id: str, owner_id: str | None, reason: str
    ) -> None:
        """Note an identifier that was presented but not applied, and why."""
        await self.conn.execute(
            "INSERT INTO identity_skips (kind, value, customer_id, owner_id, reason)"
            " VALUES ($1, $2, $3, $4, $5)",
            kind.value,
            value,
            customer_id,
            owner_id,
            reason,
        )

    async def skips_of(self, customer_id: str) -> list[asyncpg.Record]:
        """The identifiers skipped for a profile (as presenter or owner)."""
        return list(
            await self.conn.fetch(
                "SELECT kind, customer_id, owner_id, reason, at FROM identity_skips"
                " WHERE customer_id = $1 OR owner_id = $1 ORDER BY id",
                customer_id,
            )
        )

    # -- purchases ------------------------------------------------------------------------

    async def upsert_purchase(
        self,
        *,
        purchase_key: str,
        order_id: str | None,
        customer_id: str,
        channel: str,
        status: str,
        lines: Sequence[CartLine],
        total: Decimal,
        currency: str,
        location_id: str | None,
        placed_at: datetime,
        origin_id: str | None = None,
    ) -> None:
        """Record a purchase (a till sale and its order meet on the same key).

        ``origin_id``: the customer id the purchase named (what an unmerge gives back).
        """
        await self.conn.execute(
            "INSERT INTO purchases (purchase_key, order_id, customer_id, channel, status, lines,"
            " skus, total, currency, location_id, placed_at, origin_id)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12)"
            " ON CONFLICT (purchase_key) DO UPDATE SET"
            " order_id = coalesce(purchases.order_id, EXCLUDED.order_id),"
            " status = EXCLUDED.status, updated_at = now()",
            purchase_key,
            order_id,
            customer_id,
            channel,
            status,
            lines_json(lines),
            sorted({ln.sku for ln in lines}),
            total,
            currency,
            location_id,
            placed_at,
            origin_id or customer_id,
        )

    async def link_order(self, purchase_key: str, order_id: str) -> None:
        """Attach an order id to a purchase recorded before its order was known."""
        await self.conn.execute(
            "UPDATE purchases SET order_id = $2 WHERE purchase_key = $1 AND order_id IS NULL",
            purchase_key,
            order_id,
        )

    async def set_purchase_status(self, order_id: str, status: str) -> bool:
        """Move a purchase to the order's new status; False for an order we do not know."""
        return (
            await self.conn.execute(
                "UPDATE purchases SET status = $2, updated_at = now() WHERE order_id = $1",
                order_id,
                status,
            )
        ) != "UPDATE 0"

    async def history(
        self, customer_id: str, limit: int, after: HistoryCursor | None
    ) -> list[asyncpg.Record]:
        """A page of purchases, newest first."""
        if after is None:
            return list(
                await self.conn.fetch(
                    "SELECT * FROM purchases WHERE customer_id = $1"
                    " ORDER BY placed_at DESC, purchase_key DESC LIMIT $2",
                    customer_id,
                    limit,
                )
            )
        return list(
            await self.conn.fetch(
                "SELECT * FROM purchases WHERE customer_id = $1"
                " AND (placed_at, purchase_key) < ($3, $4)"
                " ORDER BY placed_at DESC, purchase_key DESC LIMIT $2",
                customer_id,
                limit,
                after.placed_at,
                after.purchase_key,
            )
        )

    async def summary(self, customer_id: str) -> asyncpg.Record:
        """Orders, spend per currency and last purchase of a shopper."""
        row = await self.conn.fetchrow(
            "SELECT count(*) AS orders, max(placed_at) AS last_purchase_at,"
            " coalesce(json_object_agg(currency, spend) FILTER (WHERE currency IS NOT NULL),"
            " '{}') AS spend FROM ("
            "  SELECT currency, sum(total)::text AS spend, count(*) AS n, max(placed_at) AS"
            "  placed_at FROM purchases WHERE customer_id = $1"
            "  AND status NOT IN ('cancelled', 'rejected') GROUP BY currency) per_currency",
            customer_id,
        )
        assert row is not None
        return row

    async def order_count(self, customer_id: str) -> int:
        """Every purchase of a shopper (any status)."""
        n: int = await self.conn.fetchval(
            "SELECT count(*) FROM purchases WHERE customer_id = $1", customer_id
        )
        return n

    # -- erasure --------------------------------------------------------------------------

    async def erase(
        self, customer_ids: Sequence[str], request_id: str | None, profile_topic: str
    ) -> None:
        """Delete every row that holds personal data of these shoppers; remember the ids.

        Their queued and published profile snapshots go too: the outbox must not keep (or
        still publish) what the shopper asked to be forgotten.
        """
        ids = list(customer_ids)
        await self.conn.execute(
            "DELETE FROM identity_skips WHERE customer_id = ANY($1::text[])"
            " OR owner_id = ANY($1::text[])",
            ids,
        )
        for table in ("identities", "purchases", "carts"):
            await self.conn.execute(f"DELETE FROM {table} WHERE customer_id = ANY($1::text[])", ids)
        await self.conn.execute(
            "DELETE FROM identity_log WHERE customer_id = ANY($1::text[])"
            " OR other_id = ANY($1::text[])",
            ids,
        )
        await self.conn.execute("DELETE FROM profiles WHERE customer_id = ANY($1::text[])", ids)
        await self.conn.execute(
            "DELETE FROM outbox WHERE topic = $2 AND key = ANY($1::text[])", ids, profile_topic
        )
        await self.conn.executemany(
            "INSERT INTO erasures (customer_id, request_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(i, request_id) for i in ids],
        )

    async def lookup(self, kind: IdKind, value: str) -> str | None:
        """The live profile holding an identifier (for the call centre and stores)."""
        return await self.owner(kind, value)
