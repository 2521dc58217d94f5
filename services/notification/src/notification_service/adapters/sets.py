"""The notification tables a lot at a time: one statement per table for a lot's events.

Like :class:`~notification_service.adapters.repository.NotificationRepository`, it runs on
the connection of the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from omni_contracts import AvailabilityChanged, ProfileUpdated

from notification_service.adapters.repository import contact_of, customer_lock
from notification_service.domain.model import Contact


@dataclass(frozen=True)
class NewNotification:
    """A decided notification to record."""

    notification_id: str
    customer_id: str
    dedup_key: str | None
    kind: str
    purpose: str
    status: str
    reason: str | None
    params: dict[str, Any]
    deferred_until: datetime | None
    correlation_id: str | None
    caused_by: str | None
    not_before: datetime | None


def newest_snapshots(snapshots: Sequence[ProfileUpdated]) -> list[ProfileUpdated]:
    """Per shopper, the snapshot that applying ``snapshots`` one by one would leave."""
    kept: dict[str, ProfileUpdated] = {}
    for s in snapshots:
        cur = kept.get(s.customer_id)
        if cur is None or cur.version is None or s.version is None or s.version >= cur.version:
            kept[s.customer_id] = s
    return [kept[c] for c in sorted(kept)]


def latest_availability(changes: Sequence[AvailabilityChanged]) -> list[AvailabilityChanged]:
    """Per SKU and location, the newest news (the later one of equal times)."""
    kept: dict[tuple[str, str], AvailabilityChanged] = {}
    for c in changes:
        cur = kept.get((c.sku, c.location_id))
        if cur is None or c.changed_at >= cur.changed_at:
            kept[(c.sku, c.location_id)] = c
    return [kept[k] for k in sorted(kept)]


class NotificationSets:
    """Set-based reads and writes of the notification tables, on one connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def lock_customers(self, customer_ids: Collection[str]) -> None:
        """:meth:`NotificationRepository.lock_customer` for many shoppers, in sorted order
        (two lots sharing shoppers wait for each other instead of deadlocking)."""
        if not customer_ids:
            return
        await self.conn.execute(
            f"SELECT {customer_lock('k')}"
            " FROM unnest($1::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
            sorted(customer_ids),
        )

    async def taken_dedup_keys(self, keys: Collection[str]) -> set[str]:
        """The dedup keys among ``keys`` a notification was already decided for."""
        if not keys:
            return set()
        rows = await self.conn.fetch(
            "SELECT dedup_key FROM notifications WHERE dedup_key = ANY($1::text[])", list(keys)
        )
        return {r["dedup_key"] for r in rows}

    async def contacts(self, customer_ids: Collection[str]) -> dict[str, Contact]:
        """The contacts of these shoppers (unknown or erased ones are absent)."""
        if not customer_ids:
            return {}
        rows = await self.conn.fetch(
            "SELECT * FROM contacts WHERE customer_id = ANY($1::text[])", list(customer_ids)
        )
        return {r["customer_id"]: contact_of(r) for r in rows}

    async def insert_notifications(self, rows: Sequence[NewNotification]) -> None:
        """Record decided notifications."""
        if not rows:
            return
        await self.conn.execute(
            "INSERT INTO notifications (notification_id, customer_id, dedup_key, kind, purpose,"
            " status, reason, params, deferred_until, correlation_id, caused_by, not_before)"
            " SELECT i, c, d, k, p, s, r, pa::jsonb, du, co, ca, nb FROM unnest($1::text[],"
            " $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],"
            " $9::timestamptz[], $10::text[], $11::text[], $12::timestamptz[])"
            " AS v(i, c, d, k, p, s, r, pa, du, co, ca, nb)",
            [r.notification_id for r in rows],
            [r.customer_id for r in rows],
            [r.dedup_key for r in rows],
            [r.kind for r in rows],
            [r.purpose for r in rows],
            [r.status for r in rows],
            [r.reason for r in rows],
            [json.dumps(r.params) for r in rows],
            [r.deferred_until for r in rows],
            [r.correlation_id for r in rows],
            [r.caused_by for r in rows],
            [r.not_before for r in rows],
        )

    async def save_contacts(self, snapshots: Sequence[ProfileUpdated]) -> None:
        """Replace each shopper's contact with their newest snapshot of the lot, unless a
        newer version is stored."""
        newest = newest_snapshots(snapshots)
        if not newest:
            return
        await self.conn.execute(
            """
            INSERT INTO contacts (customer_id, version, email, phone, push_tokens,
                                  push_subscriptions, preferences, preferred_store, updated_at)
            SELECT c, v, e, ph, pt::jsonb, ps::jsonb, pr::jsonb, st, now()
            FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                        $6::text[], $7::text[], $8::text[]) AS x(c, v, e, ph, pt, ps, pr, st)
            ON CONFLICT (customer_id) DO UPDATE SET
                version = EXCLUDED.version, email = EXCLUDED.email, phone = EXCLUDED.phone,
                push_tokens = EXCLUDED.push_tokens,
                push_subscriptions = EXCLUDED.push_subscriptions,
                preferences = EXCLUDED.preferences, preferred_store = EXCLUDED.preferred_store,
                updated_at = now()
            WHERE contacts.version IS NULL OR EXCLUDED.version IS NULL
               OR EXCLUDED.version >= contacts.version
            """,
            [s.customer_id for s in newest],
            [s.version for s in newest],
            [s.email for s in newest],
            [s.phone for s in newest],
            [json.dumps(s.push_tokens) for s in newest],
            [json.dumps([p.model_dump(mode="json") for p in s.push_subscriptions]) for s in newest],
            [s.preferences.model_dump_json() for s in newest],
            [s.preferred_store for s in newest],
        )

    async def record_purchases(self, bought: Mapping[tuple[str, str], datetime]) -> None:
        """Shoppers bought SKUs (``(customer_id, sku)`` -> when); the latest time is kept."""
        if not bought:
            return
        keys = sorted(bought)
        await self.conn.execute(
            "INSERT INTO purchases (customer_id, sku, bought_at)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])"
            " ON CONFLICT (customer_id, sku) DO UPDATE"
            " SET bought_at = greatest(purchases.bought_at, EXCLUDED.bought_at)",
            [c for c, _ in keys],
            [s for _, s in keys],
            [bought[k] for k in keys],
        )

    async def close_carts(self, why: Mapping[str, str]) -> None:
        """Carts bought (cart id -> why): never remind of them."""
        if why:
            await self.conn.execute(
                "INSERT INTO closed_carts (cart_id, why)"
                " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                list(why),
                list(why.values()),
            )

    async def save_availabilities(self, changes: Sequence[AvailabilityChanged]) -> None:
        """The latest availability per SKU and location (older news never wins)."""
        latest = latest_availability(changes)
        if not latest:
            return
        await self.conn.execute(
            """
            INSERT INTO availability (sku, location_id, available, online_available, changed_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[],
                                 $5::timestamptz[])
            ON CONFLICT (sku, location_id) DO UPDATE SET available = EXCLUDED.available,
              online_available = EXCLUDED.online_available, changed_at = EXCLUDED.changed_at
            WHERE availability.changed_at <= EXCLUDED.changed_at
            """,
            [c.sku for c in latest],
            [c.location_id for c in latest],
            [c.available for c in latest],
            [c.online_available for c in latest],
            [c.changed_at for c in latest],
        )

    async def skus_awaited(self, skus: Collection[str]) -> set[str]:
        """The SKUs among ``skus`` some shopper waits for (anywhere)."""
        if not skus:
            return set()
        rows = await self.conn.fetch(
            "SELECT DISTINCT sku FROM stock_alerts WHERE sku = ANY($1::text[]) AND done_at IS NULL",
            list(skus),
        )
        return {r["sku"] for r in rows}
