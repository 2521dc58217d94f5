"""The SQL of the notification service: contacts, trigger facts, notifications."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
from omni_contracts import Preferences

from notification_service.domain.model import Contact


@dataclass(frozen=True)
class NotificationRow:
    """One stored notification."""

    notification_id: str
    customer_id: str
    dedup_key: str | None
    kind: str
    purpose: str
    status: str
    reason: str | None
    channel: str | None
    language: str | None
    params: dict[str, Any]
    provider_message_id: str | None
    attempts: int
    recovered: bool
    deferred_until: datetime | None
    correlation_id: str | None
    caused_by: str | None
    created_at: datetime
    updated_at: datetime
    subject: str | None = None
    digest_id: str | None = None
    not_before: datetime | None = None

    @classmethod
    def of(cls, record: asyncpg.Record) -> NotificationRow:
        """From a ``notifications`` row."""
        params = record["params"]
        return cls(
            notification_id=record["notification_id"],
            customer_id=record["customer_id"],
            dedup_key=record["dedup_key"],
            kind=record["kind"],
            purpose=record["purpose"],
            status=record["status"],
            reason=record["reason"],
            channel=record["channel"],
            language=record["language"],
            params=json.loads(params) if params else {},
            provider_message_id=record["provider_message_id"],
            attempts=record["attempts"],
            recovered=record["recovered"],
            deferred_until=record["deferred_until"],
            correlation_id=record["correlation_id"],
            caused_by=record["caused_by"],
            created_at=record["created_at"],
            updated_at=record["updated_at"],
            subject=record["subject"],
            digest_id=record["digest_id"],
            not_before=record["not_before"],
        )


@dataclass(frozen=True)
class Claim:
    """Notifications claimed for sending together: the first (``row``) and the marketing
    messages of the same shopper that go with it as one digest (``rows``, the first
    included), the claim's token (the fence), whether it was taken over from an interrupted
    send, and whether that had happened before."""

    rows: tuple[NotificationRow, ...]
    token: uuid.UUID
    taken_over: bool
    taken_over_before: bool

    @property
    def row(self) -> NotificationRow:
        """The first of the claimed messages (the digest's id when there are several)."""
        return self.rows[0]


def contact_of(record: asyncpg.Record) -> Contact:
    """A ``contacts`` row as the domain's contact."""
    return Contact(
        customer_id=record["customer_id"],
        email=record["email"],
        phone=record["phone"],
        push_tokens=tuple(json.loads(record["push_tokens"])),
        push_subscriptions=tuple(json.loads(record["push_subscriptions"])),
        preferences=Preferences.model_validate(json.loads(record["preferences"])),
        preferred_store=record["preferred_store"],
    )


def customer_lock(customer_id_sql: str) -> str:
    """The advisory lock serialising one shopper's decisions, on ``customer_id_sql`` (a
    parameter or a column): one key for every place that takes it."""
    return f"pg_advisory_xact_lock(hashtextextended('notification:' || {customer_id_sql}, 0))"


class NotificationRepository:
    """Everything the service stores, on one connection (the caller's transaction)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def lock_customer(self, customer_id: str) -> None:
        """Serialise decisions for one shopper until commit (the daily cap and dedup)."""
        await self.conn.execute(f"SELECT {customer_lock('$1')}", customer_id)

    # -- contacts ------------------------------------------------------------------------

    async def contact(self, customer_id: str) -> Contact | None:
        """The shopper's contact details, None if unknown (or erased)."""
        row = await self.conn.fetchrow("SELECT * FROM contacts WHERE customer_id = $1", customer_id)
        return contact_of(row) if row else None

    async def withdraw_consent(self, customer_id: str, purpose: str, channel: str) -> None:
        """Record a withdrawn consent locally until the profile's snapshot says it too."""
        field = "consents" if purpose == "marketing" else "transactional_consents"
        await self.conn.execute(
            "UPDATE contacts SET preferences = jsonb_set(preferences, $2::text[], 'false'::jsonb),"
            " updated_at = now() WHERE customer_id = $1",
            customer_id,
            [field, channel],
        )

    async def remove_push_addresses(
        self, customer_id: str, endpoints: Iterable[str], tokens: Iterable[str]
    ) -> None:
        """Forget push subscriptions (by endpoint) and app tokens the push service said are
        gone."""
        await self.conn.execute(
            """
            UPDATE contacts SET
              push_subscriptions = coalesce((SELECT jsonb_agg(s) FROM
                  jsonb_array_elements(push_subscriptions) s
                  WHERE NOT (s->>'endpoint' = ANY($2::text[]))), '[]'::jsonb),
              push_tokens = coalesce((SELECT jsonb_agg(t) FROM jsonb_array_elements(push_tokens) t
                  WHERE NOT (t #>> '{}' = ANY($3::text[]))), '[]'::jsonb),
              updated_at = now()
            WHERE customer_id = $1
            """,
            customer_id,
            list(endpoints),
            list(tokens),
        )

    # -- carts and purchases -------------------------------------------------------------

    async def close_cart(self, cart_id: str, why: str) -> None:
        """The cart was bought (checked out or ordered): never remind of it."""
        await self.conn.execute(
            "INSERT INTO closed_carts (cart_id, why) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            cart_id,
            why,
        )

    async def cart_closed(self, cart_id: str) -> bool:
        """Whether the cart was bought."""
        return bool(
            await self.conn.fetchval("SELECT 1 FROM closed_carts WHERE cart_id = $1", cart_id)
        )

    async def bought_since(
        self, customer_id: str, skus: Iterable[str], since: datetime
    ) -> set[str]:
        """Which of ``skus`` the shopper bought at or after ``since``."""
        rows = await self.conn.fetch(
            "SELECT sku FROM purchases WHERE customer_id = $1 AND sku = ANY($2::text[])"
            " AND bought_at >= $3",
            customer_id,
            list(skus),
            since,
        )
        return {r["sku"] for r in rows}

    # -- availability and alerts ---------------------------------------------------------

    async def online_available(self, skus: Sequence[str]) -> dict[str, int]:
        """The latest ``online_available`` per SKU (SKUs never seen are absent)."""
        rows = await self.conn.fetch(
            "SELECT DISTINCT ON (sku) sku, online_available FROM availability"
            " WHERE sku = ANY($1::text[]) ORDER BY sku, changed_at DESC",
            list(skus),
        )
        return {r["sku"]: r["online_available"] for r in rows}

    async def add_stock_alert(
        self, alert_id: str, customer_id: str, sku: str, location_id: str | None
    ) -> bool:
        """Sign the shopper up; False when the same alert is already open."""
        result = await self.conn.execute(
            "INSERT INTO stock_alerts (alert_id, customer_id, sku, location_id)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            alert_id,
            customer_id,
            sku,
            location_id,
        )
        return result == "INSERT 0 1"

    async def store_available(self, sku: str, location_id: str) -> int:
        """The latest ``available`` of ``sku`` at ``location_id`` (0 when never seen)."""
        value = await self.conn.fetchval(
            "SELECT available FROM availability WHERE sku = $1 AND location_id = $2",
            sku,
            location_id,
        )
        return int(value or 0)

    async def take_alerts(
        self,
        sku: str,
        location_id: str,
        store_available: bool,
        online_available: bool,
        limit: int,
    ) -> list[asyncpg.Record]:
        """Close and return up to ``limit`` of the open alerts this availability satisfies,
        oldest first (each fires once; alerts another transaction is taking are skipped)."""
        return await self.conn.fetch(
            """
            UPDATE stock_alerts SET done_at = now()
            WHERE alert_id IN (
                SELECT alert_id FROM stock_alerts
                WHERE done_at IS NULL AND sku = $1
                  AND ((location_id = $2 AND $3) OR (location_id IS NULL AND $4))
                ORDER BY requested_at, alert_id LIMIT $5 FOR UPDATE SKIP LOCKED
            )
            RETURNING alert_id, customer_id, sku, location_id
            """,
            sku,
            location_id,
            store_available,
            online_available,
            limit,
        )

    # -- offers --------------------------------------------------------------------------

    async def save_offer(
        self,
        offer_key: str,
        customer_id: str,
        *,
        description: str | None,
        sku: str | None,
        reward: str | None,
        valid_until: datetime | None,
    ) -> None:
        """Keep a loyalty offer for the shopper's next cart reminder."""
        await self.conn.execute(
            "INSERT INTO offers (offer_key, customer_id, description, sku, reward, valid_until)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (offer_key) DO NOTHING",
            offer_key,
            customer_id,
            description,
            sku,
            reward,
            valid_until,
        )

    async def current_offer(self, customer_id: str, now: datetime) -> str | None:
        """A short description of the shopper's latest valid offer, if any."""
        row = await self.conn.fetchrow(
            "SELECT description, reward, sku FROM offers WHERE customer_id = $1"
            " AND (valid_until IS NULL OR valid_until > $2) ORDER BY issued_at DESC LIMIT 1",
            customer_id,
            now,
        )
        if row is None:
            return None
        parts = [row["description"] or row["reward"] or "a personal offer"]
        if row["reward"] and row["description"]:
            parts.append(f"({row['reward']})")
        if row["sku"]:
            parts.append(f"on {row['sku']}")
        return " ".join(parts)

    # -- notifications -------------------------------------------------------------------

    async def get(self, notification_id: str, *, lock: bool = False) -> NotificationRow | None:
        """One notification (locked until commit with ``lock``)."""
        row = await self.conn.fetchrow(
            "SELECT * FROM notifications WHERE notification_id = $1"
            + (" FOR UPDATE" if lock else ""),
            notification_id,
        )
        return NotificationRow.of(row) if row else None

    async def decide(
        self,
        notification_id: str,
        status: str,
        *,
        reason: str | None = None,
        deferred_until: datetime | None = None,
        not_before: datetime | None = None,
    ) -> None:
        """A deferred notification's new decision (pending, deferred again, suppressed)."""
        await self.conn.execute(
            "UPDATE notifications SET status = $2, reason = $3, deferred_until = $4,"
            " not_before = $5, decided_at = now(), updated_at = now()"
            " WHERE notification_id = $1",
            notification_id,
            status,
            reason,
            deferred_until,
            not_before,
        )

    async def contacts_since(
        self, customer_id: str, since: datetime, *, transactional: bool
    ) -> list[datetime]:
        """When the shopper was contacted (or is about to be) since ``since``: one time per
        message, on every channel; a digest, and the marketing messages waiting to go
        together, count once. Transactional messages count when ``transactional``."""
        rows = await self.conn.fetch(
            """
            SELECT min(decided_at) AS at FROM notifications
            WHERE customer_id = $1 AND status IN ('pending', 'sending', 'sent')
              AND decided_at > $2 AND (purpose = 'marketing' OR $3)
            GROUP BY coalesce(digest_id, CASE WHEN status = 'pending' AND purpose = 'marketing'
                                             THEN '' ELSE notification_id END)
            """,
            customer_id,
            since,
            transactional,
        )
        return [r["at"] for r in rows]

    async def open_digest(self, customer_id: str) -> NotificationRow | None:
        """The shopper's oldest marketing message waiting to be sent (not yet claimed): what
        comes due now goes with it."""
        row = await self.conn.fetchrow(
            "SELECT * FROM notifications WHERE customer_id = $1 AND purpose = 'marketing'"
            " AND status = 'pending' ORDER BY created_at LIMIT 1",
            customer_id,
        )
        return NotificationRow.of(row) if row else None

    async def deferred_due(
        self, customer_id: str, until: datetime, timer_kind: str, exclude: str
    ) -> list[NotificationRow]:
        """The shopper's other deferred messages due by ``until``, locked with their timers
        (those another transaction is firing are left to it), oldest first; their timers are
        removed: they are decided now."""
        rows = await self.conn.fetch(
            """
            SELECT n.* FROM notifications n
            JOIN timers t ON t.kind = $3 AND t.key = n.notification_id
            WHERE n.customer_id = $1 AND n.status = 'deferred' AND n.deferred_until <= $2
              AND n.notification_id <> $4
            ORDER BY n.created_at FOR UPDATE OF n, t SKIP LOCKED
            """,
            customer_id,
            until,
            timer_kind,
            exclude,
        )
        found = [NotificationRow.of(r) for r in rows]
        if found:
            await self.conn.execute(
                "DELETE FROM timers WHERE kind = $1 AND key = ANY($2::text[])",
                timer_kind,
                [r.notification_id for r in found],
            )
        return found

    async def claim(self, lease_s: float) -> Claim | None:
        """Take the next message to send and record the intent (committed by the caller).

        The claim writes a new token: only its holder may record the outcome (:meth:`finish`).
        A ``sending`` row whose lease ran out (the process died between intent and outcome) is
        taken over, with the digest it was sent in; the claim says so, and whether it had
        been taken over before. A marketing message takes the shopper's other pending
        marketing messages with it: they go as one digest.

        A shopper's messages go out one at a time, oldest first: one waits while an older
        one of the same shopper is due or being sent (the dispatcher's workers would
        otherwise race, and a refund could arrive before its ready-for-pickup). A marketing
        message waiting for its digest (``not_before``) is not due yet and holds nothing up.
        """
        token = uuid.uuid4()
        row = await self.conn.fetchrow(
            """
            WITH next AS (
                SELECT notification_id, status AS was, recovered AS was_recovered,
                       claim_token AS was_token
                FROM notifications c
                WHERE ((status = 'pending' AND (not_before IS NULL OR not_before <= now()))
                       OR (status = 'sending' AND claimed_at < now() - make_interval(secs => $1)))
                  AND NOT EXISTS (
                      SELECT 1 FROM notifications o
                      WHERE o.customer_id = c.customer_id AND o.created_at < c.created_at
                        AND (o.status = 'sending' OR (o.status = 'pending'
                             AND (o.not_before IS NULL OR o.not_before <= now()))))
                ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED
            )
            UPDATE notifications n SET status = 'sending', attempts = n.attempts + 1,
                claimed_at = now(), updated_at = now(), claim_token = $2,
                recovered = n.recovered OR next.was = 'sending'
            FROM next WHERE n.notification_id = next.notification_id
            RETURNING n.*, next.was AS was, next.was_recovered AS was_recovered,
                      next.was_token AS was_token
            """,
            lease_s,
            token,
        )
        if row is None:
            return None
        first = NotificationRow.of(row)
        taken_over = row["was"] == "sending"
        others: list[asyncpg.Record] = []
        if taken_over and row["was_token"] is not None:
            # The digest it was sent in (the same claim) is taken over with it.
            others = await self.conn.fetch(
                """
                UPDATE notifications SET attempts = attempts + 1, claimed_at = now(),
                    updated_at = now(), claim_token = $3, recovered = true
                WHERE claim_token = $1 AND status = 'sending' AND notification_id <> $2
                RETURNING *
                """,
                row["was_token"],
                first.notification_id,
                token,
            )
        elif not taken_over and first.purpose == "marketing":
            # Decisions for the shopper hold this lock until they commit: a message decided
            # to join the digest is either in it now or decided after it (and counted so).
            await self.lock_customer(first.customer_id)
            others = await self.conn.fetch(
                """
                WITH joining AS (
                    SELECT notification_id FROM notifications
                    WHERE customer_id = $1 AND purpose = 'marketing' AND status = 'pending'
                      AND notification_id <> $2
                    ORDER BY created_at FOR UPDATE SKIP LOCKED
                )
                UPDATE notifications n SET status = 'sending', attempts = n.attempts + 1,
                    claimed_at = now(), updated_at = now(), claim_token = $3
                FROM joining WHERE n.notification_id = joining.notification_id
                RETURNING n.*
                """,
                first.customer_id,
                first.notification_id,
                token,
            )
        rest = sorted((NotificationRow.of(r) for r in others), key=lambda r: r.created_at)
        rows = (first, *rest)
        if rest and not taken_over:
            await self.conn.execute(
                "UPDATE notifications SET digest_id = $1 WHERE claim_token = $2",
                first.notification_id,
                token,
            )
            rows = tuple(replace(r, digest_id=first.notification_id) for r in rows)
        return Claim(rows, token, taken_over, bool(row["was_recovered"]))

    async def finish(
        self,
        notification_id: str,
        token: uuid.UUID,
        status: str,
        *,
        channel: str | None,
        reason: str | None = None,
        provider_message_id: str | None = None,
        language: str | None = None,
        subject: str | None = None,
        body: str | None = None,
    ) -> bool:
        """Record a send's outcome, if the claim ``token`` still holds it; False when another
        claim took it over meanwhile (its outcome is then that claim's to record)."""
        result = await self.conn.execute(
            """
            UPDATE notifications SET status = $2, channel = $3, reason = $4,
                provider_message_id = $5, language = $6, subject = $7, body = $8,
                updated_at = now()
            WHERE notification_id = $1 AND status = 'sending' AND claim_token = $9
            """,
            notification_id,
            status,
            channel,
            reason,
            provider_message_id,
            language,
            subject,
            body,
            token,
        )
        return result != "UPDATE 0"

    async def list_for(self, customer_id: str, limit: int) -> list[NotificationRow]:
        """The shopper's notifications, newest first."""
        rows = await self.conn.fetch(
            "SELECT * FROM notifications WHERE customer_id = $1"
            " ORDER BY created_at DESC, notification_id LIMIT $2",
            customer_id,
            limit,
        )
        return [NotificationRow.of(r) for r in rows]

    async def merge(self, surviving_id: str, merged_ids: Sequence[str]) -> None:
        """Profiles were merged: alerts, offers, purchases and history move to the survivor,
        each row remembering the id it was recorded under (``origin_customer_id``), so an
        unmerge can give it back; the merged ids' contacts go (the survivor's snapshot
        follows)."""
        merged = list(merged_ids)
        await self.conn.execute(
            "UPDATE stock_alerts SET customer_id = $1,"
            " origin_customer_id = coalesce(origin_customer_id, customer_id)"
            " WHERE customer_id = ANY($2::text[])"
            " AND done_at IS NULL AND NOT EXISTS (SELECT 1 FROM stock_alerts s"
            "  WHERE s.customer_id = $1 AND s.sku = stock_alerts.sku AND s.done_at IS NULL"
            "  AND coalesce(s.location_id, '') = coalesce(stock_alerts.location_id, ''))",
            surviving_id,
            merged,
        )
        for table in ("offers", "notifications"):
            await self.conn.execute(
                f"UPDATE {table} SET customer_id = $1,"
                " origin_customer_id = coalesce(origin_customer_id, customer_id)"
                " WHERE customer_id = ANY($2::text[])",
                surviving_id,
                merged,
            )
        # A SKU both bought stays the survivor's own (one row per shopper and SKU).
        await self.conn.execute(
            """
            INSERT INTO purchases (customer_id, sku, bought_at, origin_customer_id)
            SELECT DISTINCT ON (sku) $1, sku, bought_at, coalesce(origin_customer_id, customer_id)
            FROM purchases WHERE customer_id = ANY($2::text[])
            ORDER BY sku, bought_at DESC, customer_id
            ON CONFLICT (customer_id, sku) DO UPDATE
              SET bought_at = greatest(purchases.bought_at, EXCLUDED.bought_at)
            """,
            surviving_id,
            merged,
        )
        await self.conn.execute("DELETE FROM purchases WHERE customer_id = ANY($1::text[])", merged)
        await self.conn.execute("DELETE FROM contacts WHERE customer_id = ANY($1::text[])", merged)

    async def unmerge(self, surviving_id: str, restored_id: str) -> None:
        """A merge was undone: the rows a merge moved from ``restored_id`` to the survivor
        (alerts, offers, purchases, notification history) are its own again. Its contact
        comes back with its own snapshot, which customer-profile publishes next. Undoing
        twice finds nothing left to move."""
        await self.conn.execute(
            "UPDATE stock_alerts SET customer_id = $2, origin_customer_id = NULL"
            " WHERE customer_id = $1 AND origin_customer_id = $2"
            " AND (done_at IS NOT NULL OR NOT EXISTS (SELECT 1 FROM stock_alerts s"
            "  WHERE s.customer_id = $2 AND s.sku = stock_alerts.sku AND s.done_at IS NULL"
            "  AND coalesce(s.location_id, '') = coalesce(stock_alerts.location_id, '')))",
            surviving_id,
            restored_id,
        )
        for table in ("offers", "notifications"):
            await self.conn.execute(
                f"UPDATE {table} SET customer_id = $2, origin_customer_id = NULL"
                " WHERE customer_id = $1 AND origin_customer_id = $2",
                surviving_id,
                restored_id,
            )
        await self.conn.execute(
            """
            WITH back AS (
                DELETE FROM purchases WHERE customer_id = $1 AND origin_customer_id = $2
                RETURNING sku, bought_at
            )
            INSERT INTO purchases (customer_id, sku, bought_at)
            SELECT $2, sku, bought_at FROM back
            ON CONFLICT (customer_id, sku) DO UPDATE
              SET bought_at = greatest(purchases.bought_at, EXCLUDED.bought_at)
            """,
            surviving_id,
            restored_id,
        )

    async def erase(self, customer_id: str) -> list[str]:
        """Drop the shopper's contacts, message bodies and trigger facts; returns the ids of
        notifications that will now never go out (their timers are the caller's)."""
        for table in ("contacts", "stock_alerts", "offers", "purchases"):
            await self.conn.execute(f"DELETE FROM {table} WHERE customer_id = $1", customer_id)
        await self.conn.execute(
            "DELETE FROM timers WHERE payload->>'customer_id' = $1", customer_id
        )
        await self.conn.execute(
            "DELETE FROM dead_timers WHERE payload->>'customer_id' = $1 OR key IN"
            " (SELECT notification_id FROM notifications WHERE customer_id = $1)",
            customer_id,
        )
        stopped = await self.conn.fetch(
            "UPDATE notifications SET status = 'suppressed', reason = 'erased', updated_at = now()"
            " WHERE customer_id = $1 AND status IN ('pending', 'deferred')"
            " RETURNING notification_id",
            customer_id,
        )
        # A send in flight loses its claim: its outcome, recorded after the erasure, would
        # write the subject and body back (finish() needs the token). Its reason is a code.
        await self.conn.execute(
            "UPDATE notifications SET params = NULL, subject = NULL, body = NULL,"
            " claim_token = NULL,"
            " status = CASE WHEN status = 'sending' THEN 'suppressed' ELSE status END,"
            " reason = CASE WHEN status = 'sending' THEN 'erased' ELSE reason END"
            " WHERE customer_id = $1",
            customer_id,
        )
        return [r["notification_id"] for r in stopped]
