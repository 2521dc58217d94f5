"""The customer-profile tables a lot at a time: one statement per table for a lot's shoppers.

Like :class:`~customer_profile_service.adapters.repository.ProfileRepository`, it runs on the
connection of the caller's transaction. Rows are locked in key order, so two lots touching
the same shoppers from different topics wait for each other instead of deadlocking.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from customer_profile_service.adapters.cart_tables import CartRow, lines_json
from customer_profile_service.adapters.repository import _PROFILE_COLUMNS, ProfileRow
from customer_profile_service.domain import CartLine, IdKind


@dataclass
class Purchase:
    """A purchase to record (a till sale and its order meet on the same key)."""

    purchase_key: str
    order_id: str | None
    customer_id: str
    channel: str
    status: str
    lines: Sequence[CartLine]
    total: Decimal
    currency: str
    location_id: str | None
    placed_at: datetime
    origin_id: str
    """The customer id the purchase named: what an unmerge gives back."""


class ProfileSets:
    """Set-based reads and writes of the customer-profile tables, on one connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def lock_all(self, namespace: str, what: Collection[str]) -> None:
        """:meth:`ProfileRepository.lock` for many keys, taken in sorted order."""
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(k))"
            " FROM unnest($1::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
            [f"{namespace}:{w}" for w in sorted(what)],
        )

    async def erased_among(self, customer_ids: Collection[str]) -> set[str]:
        """The shoppers among ``customer_ids`` who asked to be forgotten."""
        rows = await self.conn.fetch(
            "SELECT customer_id FROM erasures WHERE customer_id = ANY($1::text[])",
            list(customer_ids),
        )
        return {r["customer_id"] for r in rows}

    async def create_profiles(self, first_seen: Mapping[str, datetime]) -> set[str]:
        """Create the empty profiles that do not exist yet; returns those created.

        A live profile seen earlier by a late signal takes the earlier start, as
        :meth:`ProfileRepository.create_profile` does.
        """
        if not first_seen:
            return set()
        ids = sorted(first_seen)
        rows = await self.conn.fetch(
            "INSERT INTO profiles (customer_id, created_at)"
            " SELECT * FROM unnest($1::text[], $2::timestamptz[])"
            " ON CONFLICT (customer_id) DO UPDATE SET created_at = EXCLUDED.created_at"
            " WHERE profiles.merged_into IS NULL AND profiles.created_at > EXCLUDED.created_at"
            " RETURNING customer_id, xmax = 0 AS created",
            ids,
            [first_seen[i] for i in ids],
        )
        return {r["customer_id"] for r in rows if r["created"]}

    async def bump_versions(self, customer_ids: Collection[str]) -> dict[str, ProfileRow]:
        """Bump the snapshot version of these profiles; each row as it now is."""
        rows = await self.conn.fetch(
            "WITH l AS (SELECT customer_id FROM profiles WHERE customer_id = ANY($1::text[])"
            " ORDER BY customer_id FOR UPDATE)"
            " UPDATE profiles p SET version = p.version + 1, updated_at = now() FROM l"
            f" WHERE p.customer_id = l.customer_id RETURNING {_qualified('p')}",
            sorted(customer_ids),
        )
        return {r["customer_id"]: ProfileRow.of(r) for r in rows}

    async def identifiers(
        self, customer_ids: Collection[str]
    ) -> dict[str, dict[IdKind, list[str]]]:
        """Every identifier of these profiles, per profile and kind, oldest first."""
        found: dict[str, dict[IdKind, list[str]]] = {
            i: {kind: [] for kind in IdKind} for i in customer_ids
        }
        rows = await self.conn.fetch(
            "SELECT customer_id, kind, value FROM identities WHERE customer_id = ANY($1::text[])"
            " ORDER BY customer_id, first_seen, value",
            list(customer_ids),
        )
        for r in rows:
            found[r["customer_id"]][IdKind(r["kind"])].append(r["value"])
        return found

    async def record_purchases(self, purchases: Sequence[Purchase]) -> None:
        """Record purchases; one that exists keeps its order id and takes the new status."""
        if not purchases:
            return
        ps = list(purchases)
        await self.conn.execute(
            "INSERT INTO purchases (purchase_key, order_id, customer_id, channel, status, lines,"
            " skus, total, currency, location_id, placed_at, origin_id)"
            " SELECT k, o, c, ch, st, l::jsonb, ARRAY(SELECT jsonb_array_elements_text(s::jsonb)),"
            " t, cur, loc, at, og FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
            " $5::text[], $6::text[], $7::text[], $8::numeric[], $9::text[], $10::text[],"
            " $11::timestamptz[], $12::text[]) AS v(k, o, c, ch, st, l, s, t, cur, loc, at, og)"
            " ON CONFLICT (purchase_key) DO UPDATE SET"
            " order_id = coalesce(purchases.order_id, EXCLUDED.order_id),"
            " status = EXCLUDED.status, updated_at = now()",
            [p.purchase_key for p in ps],
            [p.order_id for p in ps],
            [p.customer_id for p in ps],
            [p.channel for p in ps],
            [p.status for p in ps],
            [lines_json(p.lines) for p in ps],
            [json.dumps(sorted({ln.sku for ln in p.lines})) for p in ps],
            [p.total for p in ps],
            [p.currency for p in ps],
            [p.location_id for p in ps],
            [p.placed_at for p in ps],
            [p.origin_id for p in ps],
        )

    async def link_orders(self, order_ids: Mapping[str, str]) -> None:
        """Attach order ids (by purchase key) to purchases recorded before their order."""
        if order_ids:
            await self.conn.execute(
                "UPDATE purchases p SET order_id = v.o FROM unnest($1::text[], $2::text[])"
                " AS v(k, o) WHERE p.purchase_key = v.k AND p.order_id IS NULL",
                list(order_ids),
                list(order_ids.values()),
            )

    async def set_purchase_statuses(self, statuses: Mapping[str, str]) -> None:
        """Move purchases to their orders' new statuses (orders we do not know: nothing)."""
        if statuses:
            await self.conn.execute(
                "UPDATE purchases p SET status = v.s, updated_at = now()"
                " FROM unnest($1::text[], $2::text[]) AS v(o, s) WHERE p.order_id = v.o",
                list(statuses),
                list(statuses.values()),
            )

    async def prefer_stores(self, customer_ids: Collection[str]) -> set[str]:
        """Set each shopper's preferred store to the one they buy at most (ties: the most
        recent); returns the shoppers whose preferred store changed."""
        rows = await self.conn.fetch(
            "WITH best AS (SELECT DISTINCT ON (customer_id) customer_id, location_id"
            " FROM purchases WHERE customer_id = ANY($1::text[]) AND location_id IS NOT NULL"
            " GROUP BY customer_id, location_id"
            " ORDER BY customer_id, count(*) DESC, max(placed_at) DESC)"
            " UPDATE profiles p SET preferred_store = best.location_id, updated_at = now()"
            " FROM best WHERE p.customer_id = best.customer_id"
            " AND p.preferred_store IS DISTINCT FROM best.location_id RETURNING p.customer_id",
            sorted(customer_ids),
        )
        return {r["customer_id"] for r in rows}

    async def live_carts_before(self, last_purchase: Mapping[str, datetime]) -> list[CartRow]:
        """Shoppers' carts still awaiting their timer, last active at or before each
        shopper's purchase; locked."""
        rows = await self.conn.fetch(
            "SELECT c.* FROM carts c JOIN unnest($1::text[], $2::timestamptz[]) AS v(id, at)"
            " ON c.customer_id = v.id WHERE c.status = 'open' AND c.last_activity_at <= v.at"
            " ORDER BY c.cart_id FOR UPDATE OF c",
            list(last_purchase),
            list(last_purchase.values()),
        )
        return [CartRow.of(r) for r in rows]

    async def start_checked_out_carts(self, carts: Sequence[CartRow]) -> None:
        """Remember carts first heard of by their checkout, as checked out."""
        if not carts:
            return
        await self.conn.execute(
            "INSERT INTO carts (cart_id, customer_id, anonymous_id, channel, status, items, skus,"
            " value, currency, contents_hash, announced_hash, last_activity_at, origin_id)"
            " SELECT i, c, NULL, ch, 'checked_out', '[]'::jsonb, '{}', 0, NULL, h, NULL, at, og"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],"
            " $6::text[]) AS v(i, c, ch, h, at, og) ON CONFLICT (cart_id) DO NOTHING",
            [c.cart_id for c in carts],
            [c.customer_id for c in carts],
            [c.channel for c in carts],
            [c.contents_hash for c in carts],
            [c.last_activity_at for c in carts],
            [c.origin_id or c.customer_id for c in carts],
        )

    async def set_cart_statuses(self, cart_ids: Collection[str], status: str) -> None:
        """Move carts to ``status``."""
        if cart_ids:
            await self.conn.execute(
                "UPDATE carts SET status = $2, updated_at = now() WHERE cart_id = ANY($1::text[])",
                sorted(cart_ids),
                status,
            )


def _qualified(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in _PROFILE_COLUMNS.split(","))
