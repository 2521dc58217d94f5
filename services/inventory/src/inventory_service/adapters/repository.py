"""PostgreSQL access for inventory: every query the service runs, on one connection.

Stock changes follow one discipline, which keeps them correct with any number of instances:

1. lock the SKUs concerned (transaction-scoped advisory locks, taken in one fixed order, so
   two orders naming the same SKUs in opposite orders cannot deadlock) and read their stock
   rows, in one round trip: the rows cannot change while the locks are held;
2. write changes as conditional deltas (``reserved = reserved + n WHERE on_hand - reserved
   >= n``), with the table's CHECK constraints as the last line of defence.

The SKU lock also serialises the availability events of one SKU, so ``online_available``
on ``inventory.availability.v1`` never goes back in time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from omni_contracts import AvailabilityStatus

from inventory_service.domain import (
    Hold,
    Key,
    Location,
    LocationKind,
    Shortfall,
    StockLevel,
)

# No guard: the delta applies whatever is available (the CHECKs still hold).
NO_GUARD = -(2**31)


class StockConflict(RuntimeError):
    """A conditional stock update did not apply: the rows were not as read.

    Cannot happen while the SKU locks are held; if it does, the transaction rolls back and
    the event is retried.
    """


@dataclass(frozen=True, slots=True)
class StockWrite:
    """A change to one stock row: deltas, the status now told, and the guard."""

    sku: str
    location_id: str
    on_hand_delta: int
    reserved_delta: int
    status: AvailabilityStatus
    # Apply only while on_hand - reserved >= min_available (e.g. units held + safety stock).
    min_available: int = NO_GUARD


@dataclass(frozen=True, slots=True)
class Reservation:
    """A reservation as stored: its state and where its units are held."""

    order_id: str
    state: str
    fulfillment: str
    expires_at: datetime | None
    holds: tuple[Hold, ...]
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewReservation:
    """A reservation to record: ``held`` with its holds, or ``rejected`` with why."""

    order_id: str
    state: str
    fulfillment: str
    pickup_location_id: str | None
    channel: str
    expires_at: datetime | None
    holds: tuple[Hold, ...]
    reason: str | None
    correlation_id: str | None


@dataclass(frozen=True, slots=True)
class LostDemand:
    """What a rejected order would have sold."""

    order_id: str
    fulfillment: str
    location_id: str | None
    channel: str | None
    shortfalls: tuple[Shortfall, ...]


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """A location's policy change still being told: the policy told before it, and the
    last SKU told since (None: none yet)."""

    location_id: str
    ships_online: bool
    safety_stock: int
    low_stock_threshold: int
    after_sku: str | None

    def told(self, now: Location) -> Location:
        """``now`` as channels were told it: with the policy from before the change."""
        return replace(
            now,
            ships_online=self.ships_online,
            safety_stock=self.safety_stock,
            low_stock_threshold=self.low_stock_threshold,
        )


def _numbered(skus: Sequence[str], wanted: Mapping[str, int], last: Mapping[str, int]) -> list[int]:
    """Versions for ``skus`` in order, given each SKU's count and its last version now."""
    next_of = {sku: last[sku] - wanted[sku] + 1 for sku in wanted}
    versions = []
    for sku in skus:
        versions.append(next_of[sku])
        next_of[sku] += 1
    return versions


def _location(row: Mapping[str, Any]) -> Location:
    return Location(
        location_id=row["location_id"],
        name=row["name"],
        kind=LocationKind(row["kind"]),
        ships_online=row["ships_online"],
        offers_pickup=row["offers_pickup"],
        safety_stock=row["safety_stock"],
        low_stock_threshold=row["low_stock_threshold"],
    )


class InventoryRepository:
    """Inventory's tables, seen through one connection (inside the caller's transaction)."""

    def __init__(self, conn: asyncpg.Connection, lock_namespace: str = "inventory") -> None:
        self.conn = conn
        self._lock_namespace = f"{lock_namespace}.sku:"

    # -- locks and stock -----------------------------------------------------------------------

    async def lock_and_read(
        self, skus: Iterable[str], also_locations: Iterable[str] = ()
    ) -> tuple[dict[Key, StockLevel], dict[Key, AvailabilityStatus], dict[str, Location]]:
        """Lock ``skus`` for this transaction, then read every stock row of them (all
        locations), the status last told per row, and the locations of those rows plus
        ``also_locations``.

        One round trip (``lock_and_read_stock`` in migration 0002): the read happens after
        the locks are held, so it sees whatever the previous holder committed.
        """
        rows = await self.conn.fetch(
            "SELECT * FROM lock_and_read_stock($1, $2::text[], $3::text[])",
            self._lock_namespace,
            sorted(set(skus)),
            sorted(set(also_locations)),
        )
        levels: dict[Key, StockLevel] = {}
        told: dict[Key, AvailabilityStatus] = {}
        locations: dict[str, Location] = {}
        for row in rows:
            if row["what"] == "stock":
                key = (row["sku"], row["location_id"])
                levels[key] = StockLevel(key[0], key[1], row["on_hand"], row["reserved"])
                told[key] = AvailabilityStatus(row["status"])
            else:
                locations[row["location_id"]] = _location(row)
        return levels, told, locations

    async def write_stock(
        self, writes: Sequence[StockWrite], new_rows: Iterable[Key], told: Sequence[str] = ()
    ) -> list[int]:
        """Create ``new_rows`` (empty), then apply ``writes`` as guarded deltas and number the
        availability events of ``told`` (one per item, in order), in one statement; returns
        the versions. The counter's row lock is held until commit, so versions of a SKU rise
        in the order the events reach the outbox.

        Raises :class:`StockConflict` when a guard stops any of them.
        """
        fresh = sorted(set(new_rows))
        if fresh:  # rare: the first units of a SKU at a location
            await self.conn.execute(
                "INSERT INTO stock (sku, location_id)"
                " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                [sku for sku, _ in fresh],
                [loc for _, loc in fresh],
            )
        if not writes and not told:
            return []
        ordered = sorted(writes, key=lambda w: (w.sku, w.location_id))
        wanted: dict[str, int] = {}
        for sku in told:
            wanted[sku] = wanted.get(sku, 0) + 1
        rows = await self.conn.fetch(
            "WITH w AS ("
            "  UPDATE stock AS s"
            "     SET on_hand = s.on_hand + c.on_hand_delta,"
            "         reserved = s.reserved + c.reserved_delta,"
            "         status = c.status, updated_at = now()"
            "    FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::text[], $6::int[])"
            "         AS c(sku, location_id, on_hand_delta, reserved_delta, status, min_available)"
            "   WHERE s.sku = c.sku AND s.location_id = c.location_id"
            "     AND s.on_hand - s.reserved >= c.min_available"
            "  RETURNING s.sku"
            "), v AS ("
            "  INSERT INTO sku_versions (sku, version)"
            "  SELECT * FROM unnest($7::text[], $8::bigint[]) ORDER BY 1"
            "  ON CONFLICT (sku) DO UPDATE SET version = sku_versions.version + EXCLUDED.version"
            "  RETURNING sku, version"
            ") SELECT sku, NULL::bigint AS version FROM w UNION ALL SELECT sku, version FROM v",
            [w.sku for w in ordered],
            [w.location_id for w in ordered],
            [w.on_hand_delta for w in ordered],
            [w.reserved_delta for w in ordered],
            [str(w.status) for w in ordered],
            [w.min_available for w in ordered],
            list(wanted),
            list(wanted.values()),
        )
        applied = sum(1 for r in rows if r["version"] is None)
        if applied != len(ordered):
            raise StockConflict(f"{len(ordered) - applied} stock update(s) did not apply")
        return _numbered(told, wanted, {r["sku"]: r["version"] for r in rows if r["version"]})

    # -- locations -----------------------------------------------------------------------------

    async def location(self, location_id: str, *, for_update: bool = False) -> Location | None:
        """One location, or None; ``for_update`` locks it against other changes of it
        (not against stock rows referring to it)."""
        row = await self.conn.fetchrow(
            "SELECT * FROM locations WHERE location_id = $1"
            + (" FOR NO KEY UPDATE" if for_update else ""),
            location_id,
        )
        return _location(row) if row else None

    async def all_locations(self) -> list[Location]:
        """Every location, by id."""
        rows = await self.conn.fetch("SELECT * FROM locations ORDER BY location_id")
        return [_location(row) for row in rows]

    async def save_location(self, location: Location) -> bool:
        """Create or update a location; True if it was created."""
        created = await self.conn.fetchval(
            "INSERT INTO locations (location_id, name, kind, ships_online, offers_pickup,"
            "  safety_stock, low_stock_threshold) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (location_id) DO UPDATE SET name = EXCLUDED.name,"
            "  kind = EXCLUDED.kind, ships_online = EXCLUDED.ships_online,"
            "  offers_pickup = EXCLUDED.offers_pickup, safety_stock = EXCLUDED.safety_stock,"
            "  low_stock_threshold = EXCLUDED.low_stock_threshold, updated_at = now()"
            " RETURNING (xmax = 0)",
            location.location_id,
            location.name,
            str(location.kind),
            location.ships_online,
            location.offers_pickup,
            location.safety_stock,
            location.low_stock_threshold,
        )
        return bool(created)

    async def policy_change(self, location_id: str, *, lock: bool = False) -> PolicyChange | None:
        """The policy change of a location still being told, or None; ``lock`` holds it
        for this transaction (one batch of it at a time)."""
        row = await self.conn.fetchrow(
            "SELECT * FROM location_policy_changes WHERE location_id = $1"
            + (" FOR UPDATE" if lock else ""),
            location_id,
        )
        if row is None:
            return None
        return PolicyChange(
            location_id=row["location_id"],
            ships_online=row["ships_online"],
            safety_stock=row["safety_stock"],
            low_stock_threshold=row["low_stock_threshold"],
            after_sku=row["after_sku"],
        )

    async def start_policy_change(self, told: Location) -> None:
        """Record that the policy told so far, ``told``'s, is to be told again as changed."""
        await self.conn.execute(
            "INSERT INTO location_policy_changes"
            " (location_id, ships_online, safety_stock, low_stock_threshold)"
            " VALUES ($1, $2, $3, $4)",
            told.location_id,
            told.ships_online,
            told.safety_stock,
            told.low_stock_threshold,
        )

    async def advance_policy_change(self, location_id: str, after_sku: str | None) -> None:
        """The SKUs up to ``after_sku`` are told; None: the change is told whole."""
        if after_sku is None:
            await self.conn.execute(
                "DELETE FROM location_policy_changes WHERE location_id = $1", location_id
            )
        else:
            await self.conn.execute(
                "UPDATE location_policy_changes SET after_sku = $2 WHERE location_id = $1",
                location_id,
                after_sku,
            )

    # -- reservations --------------------------------------------------------------------------

    async def reservation(self, order_id: str) -> Reservation | None:
        """An order's reservation, locked for this transaction, or None."""
        row = await self.conn.fetchrow(
            "SELECT order_id, state, fulfillment, expires_at, correlation_id FROM reservations"
            " WHERE order_id = $1 FOR UPDATE",
            order_id,
        )
        if row is None:
            return None
        holds = await self.conn.fetch(
            "SELECT sku, location_id, qty FROM reservation_holds WHERE order_id = $1"
            " ORDER BY sku, location_id",
            order_id,
        )
        return Reservation(
            order_id=row["order_id"],
            state=row["state"],
            fulfillment=row["fulfillment"],
            expires_at=row["expires_at"],
            holds=tuple(Hold(h["sku"], h["location_id"], h["qty"]) for h in holds),
            correlation_id=row["correlation_id"],
        )

    async def add_reservation(
        self,
        *,
        order_id: str,
        fulfillment: str,
        pickup_location_id: str | None,
        channel: str,
        expires_at: datetime | None,
        holds: Sequence[Hold],
        state: str = "held",
        reason: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Record an order's reservation (``held`` with its holds, or ``rejected``)."""
        await self.conn.execute(
            "INSERT INTO reservations (order_id, state, fulfillment, pickup_location_id,"
            " channel, expires_at, closed_reason, correlation_id)"
            " VALUES ($1, $6, $2, $3, $4, $5, $7, $8)",
            order_id,
            fulfillment,
            pickup_location_id,
            channel,
            expires_at,
            state,
            reason,
            correlation_id,
        )
        await self.conn.executemany(
            "INSERT INTO reservation_holds (order_id, sku, location_id, qty)"
            " VALUES ($1, $2, $3, $4)",
            [(order_id, h.sku, h.location_id, h.qty) for h in holds],
        )

    async def reserved(self, order_ids: Sequence[str]) -> set[str]:
        """Which of these orders have a reservation already (of any state)."""
        rows = await self.conn.fetch(
            "SELECT order_id FROM reservations WHERE order_id = ANY($1::text[])", list(order_ids)
        )
        return {r["order_id"] for r in rows}

    async def reservations(self, order_ids: Sequence[str]) -> dict[str, Reservation]:
        """The reservations of these orders, locked for this transaction in id order."""
        rows = await self.conn.fetch(
            "SELECT r.order_id, r.state, r.fulfillment, r.expires_at, r.correlation_id,"
            " (SELECT coalesce(json_agg(json_build_object('sku', h.sku, 'location_id',"
            " h.location_id, 'qty', h.qty) ORDER BY h.sku, h.location_id), '[]')"
            " FROM reservation_holds h WHERE h.order_id = r.order_id) AS holds"
            " FROM reservations r WHERE r.order_id = ANY($1::text[])"
            " ORDER BY r.order_id FOR UPDATE OF r",
            sorted(set(order_ids)),
        )
        return {
            row["order_id"]: Reservation(
                order_id=row["order_id"],
                state=row["state"],
                fulfillment=row["fulfillment"],
                expires_at=row["expires_at"],
                holds=tuple(
                    Hold(h["sku"], h["location_id"], h["qty"]) for h in json.loads(row["holds"])
                ),
                correlation_id=row["correlation_id"],
            )
            for row in rows
        }

    async def add_reservations(self, added: Sequence[NewReservation]) -> None:
        """Record reservations (``held`` with their holds, or ``rejected``) in one statement."""
        if not added:
            return
        holds = [(r.order_id, h) for r in added for h in r.holds]
        await self.conn.execute(
            "WITH r AS ("
            "  INSERT INTO reservations (order_id, state, fulfillment, pickup_location_id,"
            "   channel, expires_at, closed_reason, correlation_id)"
            "  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
            "   $6::timestamptz[], $7::text[], $8::text[])"
            ") INSERT INTO reservation_holds (order_id, sku, location_id, qty)"
            " SELECT * FROM unnest($9::text[], $10::text[], $11::text[], $12::int[])",
            [r.order_id for r in added],
            [r.state for r in added],
            [r.fulfillment for r in added],
            [r.pickup_location_id for r in added],
            [r.channel for r in added],
            [r.expires_at for r in added],
            [r.reason for r in added],
            [r.correlation_id for r in added],
            [order_id for order_id, _ in holds],
            [h.sku for _, h in holds],
            [h.location_id for _, h in holds],
            [h.qty for _, h in holds],
        )

    async def set_reservation_states(self, order_ids: Sequence[str], state: str) -> None:
        """Move these reservations to ``state`` in one statement."""
        if order_ids:
            await self.conn.execute(
                "UPDATE reservations SET state = $2, updated_at = now()"
                " WHERE order_id = ANY($1::text[])",
                list(order_ids),
                state,
            )

    async def set_reservation_state(
        self, order_id: str, state: str, reason: str | None = None
    ) -> None:
        """Move a reservation to ``state`` (with why it closed, if it did)."""
        await self.conn.execute(
            "UPDATE reservations SET state = $2, closed_reason = coalesce($3, closed_reason),"
            " updated_at = now() WHERE order_id = $1",
            order_id,
            state,
            reason,
        )

    # -- lost demand, discrepancies, returns ---------------------------------------------------

    async def record_lost_demand(self, lost: Sequence[LostDemand]) -> None:
        """Record what rejected orders would have sold (once per order and SKU)."""
        rows = [(d, s) for d in lost for s in d.shortfalls]
        if not rows:
            return
        await self.conn.executemany(
            "INSERT INTO lost_demand (order_id, sku, location_id, fulfillment, channel,"
            " requested, available, missing, unit_price, currency, revenue)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            " ON CONFLICT (order_id, sku) DO NOTHING",
            [
                (
                    d.order_id,
                    s.sku,
                    d.location_id,
                    d.fulfillment,
                    d.channel,
                    s.requested,
                    s.available,
                    s.missing,
                    s.unit_price.quantize(Decimal("0.01")),
                    s.currency,
                    s.lost_revenue.quantize(Decimal("0.01")),
                )
                for d, s in rows
            ],
        )

    async def lost_demand_report(self, limit: int) -> list[dict[str, Any]]:
        """The biggest losses: per SKU, location and currency, most revenue first."""
        rows = await self.conn.fetch(
            "SELECT sku, location_id, fulfillment, currency, sum(missing)::int AS units,"
            "       sum(revenue) AS revenue, count(*)::int AS orders,"
            "       max(recorded_at) AS last_at"
            "  FROM lost_demand"
            " GROUP BY sku, location_id, fulfillment, currency"
            " ORDER BY revenue DESC, units DESC, sku, location_id NULLS FIRST"
            " LIMIT $1",
            limit,
        )
        return [dict(row) for row in rows]

    async def first_application(self, kind: str, fact_id: str) -> bool:
        """Record that the fact ``(kind, fact_id)`` is applied; False if it was before."""
        return bool(
            await self.conn.fetchval(
                "INSERT INTO applied_facts (kind, fact_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                kind,
                fact_id,
            )
        )

    async def first_sales(
        self, sale_ids: Sequence[str], lines: Sequence[tuple[str, str, datetime]]
    ) -> tuple[set[str], set[tuple[str, str, datetime]]]:
        """Record these sales as applied (returns those that were not before) and find which
        of their lines ``(location_id, sku, occurred_at)`` were counted after they occurred
        (strictly after, as :meth:`counted_since`), in one statement, under the SKUs' locks."""
        rows = await self.conn.fetch(
            "WITH fresh AS (INSERT INTO applied_facts (kind, fact_id)"
            "  SELECT 'sale', * FROM unnest($1::text[]) ON CONFLICT DO NOTHING RETURNING fact_id)"
            " SELECT fact_id, NULL AS location_id, NULL AS sku, NULL::timestamptz AS at"
            " FROM fresh UNION ALL"
            " SELECT NULL, f.location_id, f.sku, f.occurred_at FROM unnest($2::text[],"
            " $3::text[], $4::timestamptz[]) AS f(location_id, sku, occurred_at)"
            " JOIN stock_counts c ON c.location_id = f.location_id AND c.sku = f.sku"
            " AND c.counted_at > f.occurred_at",
            list(sale_ids),
            [f[0] for f in lines],
            [f[1] for f in lines],
            [f[2] for f in lines],
        )
        fresh = {r["fact_id"] for r in rows if r["fact_id"] is not None}
        counted = {(r["location_id"], r["sku"], r["at"]) for r in rows if r["fact_id"] is None}
        return fresh, counted

    async def counted_since(
        self, location_id: str, skus: Sequence[str], occurred_at: datetime
    ) -> set[str]:
        """The SKUs of ``skus`` counted at ``location_id`` after ``occurred_at``.

        Strictly after: a fact stamped the very instant of the count is taken as after it.
        """
        rows = await self.conn.fetch(
            "SELECT sku FROM stock_counts WHERE location_id = $1 AND sku = ANY($2::text[])"
            " AND counted_at > $3",
            location_id,
            list(skus),
            occurred_at,
        )
        return {r["sku"] for r in rows}

    async def record_count(self, sku: str, location_id: str, counted_at: datetime) -> bool:
        """Note a count as of ``counted_at``; False when a later count was recorded before.

        Two counts of one instant: the one processed last wins.
        """
        return bool(
            await self.conn.fetchval(
                "INSERT INTO stock_counts (sku, location_id, counted_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (sku, location_id) DO UPDATE SET counted_at = EXCLUDED.counted_at"
                " WHERE stock_counts.counted_at <= EXCLUDED.counted_at RETURNING true",
                sku,
                location_id,
                counted_at,
            )
        )

    async def record_discrepancy(
        self, *, sku: str, location_id: str, sale_id: str, sold: int, available: int, shortfall: int
    ) -> None:
        """Record that a till sold more than the records said was there."""
        await self.conn.execute(
            "INSERT INTO discrepancies (sku, location_id, sale_id, sold, recorded_available,"
            " shortfall) VALUES ($1, $2, $3, $4, $5, $6)",
            sku,
            location_id,
            sale_id,
            sold,
            available,
            shortfall,
        )

    async def resolve_discrepancies(self, sku: str, location_id: str, by: str) -> int:
        """Close the open discrepancies of a row (a recount happened); returns how many."""
        status = await self.conn.execute(
            "UPDATE discrepancies SET resolved_at = now(), resolved_by = $3"
            " WHERE sku = $1 AND location_id = $2 AND resolved_at IS NULL",
            sku,
            location_id,
            by,
        )
        return int(status.split()[-1])

    async def discrepancies(self, *, open_only: bool, limit: int) -> list[dict[str, Any]]:
        """Recorded discrepancies, newest first."""
        rows = await self.conn.fetch(
            "SELECT id, sku, location_id, sale_id, sold, recorded_available, shortfall,"
            "       recorded_at, resolved_at, resolved_by FROM discrepancies"
            " WHERE NOT $1 OR resolved_at IS NULL ORDER BY id DESC LIMIT $2",
            open_only,
            limit,
        )
        return [dict(row) for row in rows]

    async def first_restock(self, return_id: str, order_id: str, location_id: str) -> bool:
        """Mark a return as put back on the shelf; False if it already was."""
        inserted = await self.conn.fetchval(
            "INSERT INTO restocked_returns (return_id, order_id, location_id)"
            " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true",
            return_id,
            order_id,
            location_id,
        )
        return bool(inserted)

    # -- reads for the API ---------------------------------------------------------------------

    async def availability_of(self, sku: str) -> list[dict[str, Any]]:
        """Every location's stock of ``sku`` with its policy, by location."""
        rows = await self.conn.fetch(
            "SELECT s.location_id, l.name, l.kind, l.ships_online, l.offers_pickup,"
            "       l.safety_stock, l.low_stock_threshold, s.on_hand, s.reserved"
            "  FROM stock AS s JOIN locations AS l USING (location_id)"
            " WHERE s.sku = $1 ORDER BY s.location_id",
            sku,
        )
        return [dict(row) for row in rows]

    async def stock_at(
        self, location_id: str, *, after: str | None, limit: int
    ) -> list[StockLevel]:
        """The stock rows of a location, by SKU, after the SKU ``after`` (paging)."""
        rows = await self.conn.fetch(
            "SELECT sku, location_id, on_hand, reserved FROM stock"
            " WHERE location_id = $1 AND ($2::text IS NULL OR sku > $2) ORDER BY sku LIMIT $3",
            location_id,
            after,
            limit,
        )
        return [StockLevel(r["sku"], r["location_id"], r["on_hand"], r["reserved"]) for r in rows]

    async def online_available_of(self, skus: Sequence[str]) -> dict[str, int]:
        """``online_available`` of each SKU, computed in SQL (same rule as the domain)."""
        rows = await self.conn.fetch(
            "SELECT s.sku, sum(greatest(s.on_hand - s.reserved - l.safety_stock, 0))::int AS n"
            "  FROM stock AS s JOIN locations AS l USING (location_id)"
            " WHERE s.sku = ANY($1::text[]) AND l.ships_online GROUP BY s.sku",
            list(skus),
        )
        found = {row["sku"]: row["n"] for row in rows}
        return {sku: found.get(sku, 0) for sku in skus}
