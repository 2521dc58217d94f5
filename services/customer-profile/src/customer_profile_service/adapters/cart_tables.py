"""Carts in PostgreSQL: the part of the repository that keeps carts and their owners.

Runs on the caller's transaction's connection, like the rest of the repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from customer_profile_service.domain import CartLine


@dataclass
class CartRow:
    """A cart as stored."""

    cart_id: str
    customer_id: str | None
    anonymous_id: str | None
    channel: str
    status: str
    items: list[CartLine]
    value: Decimal
    currency: str | None
    contents_hash: str
    announced_hash: str | None
    last_activity_at: datetime
    # The customer id the cart's events named (what an unmerge gives back to it).
    origin_id: str | None = None

    @classmethod
    def of(cls, row: asyncpg.Record) -> CartRow:
        """From a ``carts`` row."""
        items = [
            CartLine(i["sku"], i["qty"], Decimal(i["unit_price"]), i["currency"])
            for i in json.loads(row["items"])
        ]
        return cls(
            cart_id=row["cart_id"],
            customer_id=row["customer_id"],
            anonymous_id=row["anonymous_id"],
            channel=row["channel"],
            status=row["status"],
            items=items,
            value=row["value"],
            currency=row["currency"],
            contents_hash=row["contents_hash"],
            announced_hash=row["announced_hash"],
            last_activity_at=row["last_activity_at"],
            origin_id=row["origin_id"],
        )


def lines_json(lines: Iterable[CartLine]) -> str:
    """Cart or purchase lines as stored (``jsonb``)."""
    return json.dumps(
        [
            {
                "sku": ln.sku,
                "qty": ln.qty,
                "unit_price": str(ln.unit_price),
                "currency": ln.currency,
            }
            for ln in lines
        ]
    )


class CartTables:
    """The ``carts`` table (mixed into the repository, on its connection)."""

    conn: asyncpg.Connection

    # -- carts ----------------------------------------------------------------------------

    async def cart(self, cart_id: str, *, for_update: bool = False) -> CartRow | None:
        """A cart, locked if asked."""
        lock = " FOR UPDATE" if for_update else ""
        row = await self.conn.fetchrow(f"SELECT * FROM carts WHERE cart_id = $1{lock}", cart_id)
        return CartRow.of(row) if row else None

    async def save_cart(self, cart: CartRow) -> None:
        """Insert or overwrite a cart."""
        await self.conn.execute(
            "INSERT INTO carts (cart_id, customer_id, anonymous_id, channel, status, items, skus,"
            " value, currency, contents_hash, announced_hash, last_activity_at, origin_id)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13)"
            " ON CONFLICT (cart_id) DO UPDATE SET customer_id = EXCLUDED.customer_id,"
            " anonymous_id = EXCLUDED.anonymous_id, channel = EXCLUDED.channel,"
            " status = EXCLUDED.status, items = EXCLUDED.items, skus = EXCLUDED.skus,"
            " value = EXCLUDED.value, currency = EXCLUDED.currency,"
            " contents_hash = EXCLUDED.contents_hash, announced_hash = EXCLUDED.announced_hash,"
            " last_activity_at = EXCLUDED.last_activity_at,"
            " origin_id = coalesce(EXCLUDED.origin_id, carts.origin_id), updated_at = now()",
            cart.cart_id,
            cart.customer_id,
            cart.anonymous_id,
            cart.channel,
            cart.status,
            lines_json(cart.items),
            sorted({ln.sku for ln in cart.items}),
            cart.value,
            cart.currency,
            cart.contents_hash,
            cart.announced_hash,
            cart.last_activity_at,
            cart.origin_id or cart.customer_id,
        )

    async def carts_for_update(self, cart_ids: Sequence[str]) -> dict[str, CartRow]:
        """Several carts, locked in id order (one round trip for a batch of timers)."""
        rows = await self.conn.fetch(
            "SELECT * FROM carts WHERE cart_id = ANY($1::text[]) ORDER BY cart_id FOR UPDATE",
            list(cart_ids),
        )
        return {r["cart_id"]: CartRow.of(r) for r in rows}

    async def profile_states(self, customer_ids: Iterable[str]) -> dict[str, str | None]:
        """Existing profiles among ``customer_ids``: id -> the profile merged into (or None)."""
        rows = await self.conn.fetch(
            "SELECT customer_id, merged_into FROM profiles WHERE customer_id = ANY($1::text[])",
            list(customer_ids),
        )
        return {r["customer_id"]: r["merged_into"] for r in rows}

    async def purchases_since(
        self, customer_ids: Iterable[str], since: datetime
    ) -> dict[str, list[tuple[str, datetime]]]:
        """``(sku, placed_at)`` bought by each shopper at or after ``since`` (not cancelled)."""
        rows = await self.conn.fetch(
            "SELECT customer_id, s AS sku, placed_at FROM purchases, unnest(skus) AS s"
            " WHERE customer_id = ANY($1::text[]) AND placed_at >= $2"
            " AND status NOT IN ('cancelled', 'rejected')",
            list(customer_ids),
            since,
        )
        found: dict[str, list[tuple[str, datetime]]] = {}
        for r in rows:
            found.setdefault(r["customer_id"], []).append((r["sku"], r["placed_at"]))
        return found

    async def settle_carts(
        self, announced: Sequence[tuple[str, str]], purchased: Sequence[str]
    ) -> None:
        """Carts announced (with the contents announced) and carts found bought."""
        if announced:
            await self.conn.execute(
                "UPDATE carts SET status = 'abandoned', announced_hash = a.hash,"
                " updated_at = now() FROM unnest($1::text[], $2::text[]) AS a(cart_id, hash)"
                " WHERE carts.cart_id = a.cart_id",
                [a[0] for a in announced],
                [a[1] for a in announced],
            )
        if purchased:
            await self.conn.execute(
                "UPDATE carts SET status = 'purchased', updated_at = now()"
                " WHERE cart_id = ANY($1::text[])",
                list(purchased),
            )

    async def adopt_anonymous_carts(
        self, anonymous_id: str, customer_id: str, origin_id: str | None = None
    ) -> list[str]:
        """The device's ownerless carts become the customer's (their timers run on);
        ``origin_id``: the customer id the login named."""
        rows = await self.conn.fetch(
            "UPDATE carts SET customer_id = $2, origin_id = $3, updated_at = now()"
            " WHERE anonymous_id = $1 AND customer_id IS NULL RETURNING cart_id",
            anonymous_id,
            customer_id,
            origin_id or customer_id,
        )
        return [r["cart_id"] for r in rows]

    async def lock_timer(self, kind: str, key: str) -> bool:
        """Lock a timer row (if armed) until commit; True if it is armed."""
        return bool(
            await self.conn.fetchval(
                "SELECT true FROM timers WHERE kind = $1 AND key = $2 FOR UPDATE", kind, key
            )
        )

    async def carts_of_devices(self, anonymous_ids: Sequence[str]) -> list[str]:
        """Every cart id started on these devices."""
        rows = await self.conn.fetch(
            "SELECT cart_id FROM carts WHERE anonymous_id = ANY($1::text[])", list(anonymous_ids)
        )
        return [r["cart_id"] for r in rows]

    async def delete_carts(self, cart_ids: Sequence[str]) -> None:
        """Forget these carts."""
        await self.conn.execute("DELETE FROM carts WHERE cart_id = ANY($1::text[])", list(cart_ids))

    async def carts_of(self, customer_ids: Sequence[str]) -> list[str]:
        """Every cart id of these shoppers."""
        rows = await self.conn.fetch(
            "SELECT cart_id FROM carts WHERE customer_id = ANY($1::text[])", list(customer_ids)
        )
        return [r["cart_id"] for r in rows]
