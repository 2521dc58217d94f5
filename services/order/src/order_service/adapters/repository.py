"""Orders in PostgreSQL: load for update, add, save, and the read queries of the API.

Runs on the connection of the caller's transaction (``tx.conn``, search_path = the order
schema), so state, idempotency keys, history and outbox rows commit together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from omni_contracts import Allocation, Channel, Fulfillment, OrderStatus, Shortage

from order_service.domain.model import Order, OrderLine

_LINES_JSON = (
    "(SELECT coalesce(json_agg(json_build_object('line_no', l.line_no, 'sku', l.sku,"
    " 'qty', l.qty, 'unit_price', l.unit_price::text, 'returned_qty', l.returned_qty)"
    " ORDER BY l.line_no), '[]') FROM order_lines l WHERE l.order_id = o.order_id) AS lines"
)


@dataclass(frozen=True)
class IdempotencyRecord:
    """An idempotency key already used: the request hash it came with and its order."""

    request_hash: str
    order_id: str


@dataclass(frozen=True)
class PageCursor:
    """Where a page of a customer's orders ends (exclusive)."""

    placed_at: datetime
    order_id: str


class OrderRepository:
    """The order aggregate's persistence, on one transaction's connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    # -- the aggregate --------------------------------------------------------------------

    async def get(self, order_id: str, *, for_update: bool = True) -> Order | None:
        """The order (locked for this transaction unless ``for_update`` is False)."""
        lock = " FOR UPDATE OF o" if for_update else ""
        row = await self.conn.fetchrow(
            f"SELECT o.*, {_LINES_JSON} FROM orders o WHERE o.order_id = $1{lock}", order_id
        )
        if row is None:
            return None
        returns = await self.conn.fetch(
            "SELECT return_id, fingerprint FROM order_returns WHERE order_id = $1", order_id
        )
        return _order(row, {r["return_id"]: r["fingerprint"] for r in returns})

    async def get_for_return(self, reference: str) -> Order | None:
        """The order a return refers to: by ``order_id``, or by an in-store ``sale_id``
        (a till knows its receipt number, not our order id)."""
        order = await self.get(reference)
        if order is not None:
            return order
        order_id = await self.conn.fetchval(
            "SELECT order_id FROM orders WHERE sale_id = $1", reference
        )
        return await self.get(order_id) if order_id else None

    async def _save_returns(self, order: Order) -> None:
        await self.conn.executemany(
            "UPDATE order_lines SET returned_qty = $3 WHERE order_id = $1 AND line_no = $2",
            [(order.order_id, ln.line_no, ln.returned_qty) for ln in order.lines],
        )
        await self.conn.executemany(
            "INSERT INTO order_returns (return_id, order_id, location_id, channel, lines,"
            " not_accepted, refund, fingerprint, received_at)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8, $9)",
            [
                (
                    r.return_id,
                    order.order_id,
                    r.location_id,
                    r.channel.value,
                    _json_models(r.lines),
                    _json_models(r.not_accepted),
                    r.refund,
                    r.fingerprint,
                    r.received_at,
                )
                for r in order.new_returns
            ],
        )

    # -- many at once (a lot of events: one statement per table) ---------------------------

    async def create(self, created: Sequence[tuple[Order, str, str]]) -> set[str]:
        """Insert new orders with their lines, history and idempotency keys (``(order, key,
        request hash)`` each) in one statement; returns the ids of the orders created.

        An order whose key is taken (created before, or by a submission racing this one: the
        key's insert waits for it) is not inserted; the caller looks its key up.
        """
        if not created:
            return set()
        orders = [order for order, _, _ in created]
        lines = [(o.order_id, ln) for o in orders for ln in o.lines]
        history = [row for o in orders for row in _history_rows(o)]
        rows = await self.conn.fetch(
            "WITH k AS ("
            "  INSERT INTO idempotency_keys (key, request_hash, order_id)"
            "  SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
            "  ON CONFLICT DO NOTHING RETURNING order_id"
            "), o AS ("
            "  INSERT INTO orders (order_id, customer_id, channel, status, fulfillment, currency,"
            "   total, paid, correlation_id, checkout_id, sale_id, cart_id, payment_reference,"
            "   points_to_redeem, pending_confirmations, placed_at)"
            "  SELECT u.order_id, u.customer_id, u.channel, u.status, u.fulfillment::jsonb,"
            "   u.currency, u.total, u.paid, u.correlation_id, u.checkout_id, u.sale_id,"
            "   u.cart_id, u.payment_reference, u.points_to_redeem,"
            "   ARRAY(SELECT jsonb_array_elements_text(u.pending::jsonb)), u.placed_at"
            "  FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[],"
            "   $9::text[], $10::numeric[], $11::numeric[], $12::text[], $13::text[],"
            "   $14::text[], $15::text[], $16::text[], $17::int[], $18::text[],"
            "   $19::timestamptz[]) AS u(order_id, customer_id, channel, status, fulfillment,"
            "   currency, total, paid, correlation_id, checkout_id, sale_id, cart_id,"
            "   payment_reference, points_to_redeem, pending, placed_at)"
            "  WHERE u.order_id IN (SELECT order_id FROM k)"
            "), l AS ("
            "  INSERT INTO order_lines (order_id, line_no, sku, qty, unit_price)"
            "  SELECT * FROM unnest($20::text[], $21::int[], $22::text[], $23::int[],"
            "   $24::numeric[]) AS u(order_id, line_no, sku, qty, unit_price)"
            "  WHERE u.order_id IN (SELECT order_id FROM k)"
            "), h AS ("
            "  INSERT INTO order_history (order_id, what, status, detail, at)"
            "  SELECT u.order_id, u.what, u.status, u.detail::jsonb, clock_timestamp()"
            "  FROM unnest($25::text[], $26::text[], $27::text[], $28::text[])"
            "   WITH ORDINALITY AS u(order_id, what, status, detail, n)"
            "  WHERE u.order_id IN (SELECT order_id FROM k) ORDER BY u.n"
            ") SELECT order_id FROM k",
            [key for _, key, _ in created],
            [request_hash for _, _, request_hash in created],
            [o.order_id for o in orders],
            [o.order_id for o in orders],
            [o.customer_id for o in orders],
            [o.channel.value for o in orders],
            [o.status.value for o in orders],
            [o.fulfillment.model_dump_json(exclude_none=True) for o in orders],
            [o.currency for o in orders],
            [o.total for o in orders],
            [o.paid for o in orders],
            [o.correlation_id for o in orders],
            [o.checkout_id for o in orders],
            [o.sale_id for o in orders],
            [o.cart_id for o in orders],
            [o.payment_reference for o in orders],
            [o.points_to_redeem for o in orders],
            [json.dumps(sorted(o.pending_confirmations)) for o in orders],
            [o.placed_at for o in orders],
            [order_id for order_id, _ in lines],
            [ln.line_no for _, ln in lines],
            [ln.sku for _, ln in lines],
            [ln.qty for _, ln in lines],
            [ln.unit_price for _, ln in lines],
            *_columns(history, 4),
        )
        return {r["order_id"] for r in rows}

    async def keys(self, keys: Sequence[str]) -> dict[str, IdempotencyRecord]:
        """The records of idempotency keys already used."""
        rows = await self.conn.fetch(
            "SELECT key, request_hash, order_id FROM idempotency_keys WHERE key = ANY($1::text[])",
            list(keys),
        )
        return {r["key"]: IdempotencyRecord(r["request_hash"], r["order_id"]) for r in rows}

    async def get_many(self, order_ids: Sequence[str]) -> dict[str, Order]:
        """The orders, locked for this transaction in id order (the ones that exist)."""
        rows = await self.conn.fetch(
            f"SELECT o.*, {_LINES_JSON}, (SELECT coalesce(json_object_agg(r.return_id,"
            " r.fingerprint), '{}') FROM order_returns r WHERE r.order_id = o.order_id)"
            " AS returns FROM orders o WHERE o.order_id = ANY($1::text[])"
            " ORDER BY o.order_id FOR UPDATE OF o",
            sorted(set(order_ids)),
        )
        return {row["order_id"]: _order(row, json.loads(row["returns"])) for row in rows}

    async def save_many(self, orders: Sequence[Order]) -> None:
        """Write back loaded orders' changes in one statement (orders with new returns also
        write their returns, rare enough to go one by one)."""
        if not orders:
            return
        for order in orders:
            if order.new_returns:
                await self._save_returns(order)
        history = [row for o in orders for row in _history_rows(o)]
        await self.conn.execute(
            "WITH u AS ("
            "  UPDATE orders o SET status = v.status,"
            "   pending_confirmations = ARRAY(SELECT jsonb_array_elements_text(v.pending::jsonb)),"
            "   allocations = v.allocations::jsonb, shortages = v.shortages::jsonb,"
            "   reason = v.reason, carrier = v.carrier, tracking_id = v.tracking_id,"
            "   promised_by = v.promised_by, eta = v.eta,"
            "   announced_etas = ARRAY(SELECT e::timestamptz"
            "    FROM jsonb_array_elements_text(v.etas::jsonb) e),"
            "   collect_by = v.collect_by, refunded = v.refunded, paid = v.paid,"
            "   updated_at = now(), version = o.version + 1"
            "  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
            "   $6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[],"
            "   $11::text[], $12::timestamptz[], $13::numeric[], $14::numeric[])"
            "   AS v(order_id, status, pending, allocations, shortages, reason, carrier,"
            "   tracking_id, promised_by, eta, etas, collect_by, refunded, paid)"
            "  WHERE o.order_id = v.order_id"
            "), h AS ("
            "  INSERT INTO order_history (order_id, what, status, detail, at)"
            "  SELECT u.order_id, u.what, u.status, u.detail::jsonb, clock_timestamp()"
            "  FROM unnest($15::text[], $16::text[], $17::text[], $18::text[])"
            "   WITH ORDINALITY AS u(order_id, what, status, detail, n) ORDER BY u.n"
            ") SELECT 1",
            [o.order_id for o in orders],
            [o.status.value for o in orders],
            [json.dumps(sorted(o.pending_confirmations)) for o in orders],
            [json.dumps([a.model_dump(mode="json") for a in o.allocations]) for o in orders],
            [json.dumps([s.model_dump(mode="json") for s in o.shortages]) for o in orders],
            [o.reason for o in orders],
            [o.carrier for o in orders],
            [o.tracking_id for o in orders],
            [o.promised_by for o in orders],
            [o.eta for o in orders],
            [json.dumps(sorted(e.isoformat() for e in o.announced_etas)) for o in orders],
            [o.collect_by for o in orders],
            [o.refunded for o in orders],
            [o.paid for o in orders],
            *_columns(history, 4),
        )

    # -- erasure --------------------------------------------------------------------------

    async def erase_customer(self, customer_id: str) -> int:
        """Pseudonymise a shopper's orders after an erasure; returns how many orders.

        Delivery addresses (with the recipient's name and phone) and the loyalty card a till
        sale named leave the orders, their history and the outbox (published rows deleted,
        unpublished ones redacted); ids, lines, amounts and states stay, as the accounts
        require.
        """
        order_ids = [
            r["order_id"]
            for r in await self.conn.fetch(
                "SELECT order_id FROM orders WHERE customer_id = $1 FOR UPDATE", customer_id
            )
        ]
        if order_ids:
            await self.conn.execute(
                "UPDATE orders SET fulfillment = fulfillment - 'address', updated_at = now()"
                " WHERE order_id = ANY($1::text[])",
                order_ids,
            )
            await self.conn.execute(
                "UPDATE order_history"
                " SET detail = (detail #- '{fulfillment,address}') - 'loyalty_card'"
                " WHERE order_id = ANY($1::text[])",
                order_ids,
            )
        # Unpublished rows still go out (deleting them would lose order events), without the
        # address or card: the contract has both optional, as an erased order's view does.
        await self.conn.execute(
            "UPDATE outbox SET payload = convert_to(((convert_from(payload, 'UTF8')::jsonb"
            " #- '{fulfillment,address}') - 'loyalty_card')::text, 'UTF8')"
            " WHERE published_at IS NULL AND payload IS NOT NULL"
            " AND convert_from(payload, 'UTF8')::jsonb ->> 'customer_id' = $1"
            " AND (convert_from(payload, 'UTF8')::jsonb #> '{fulfillment,address}' IS NOT NULL"
            " OR convert_from(payload, 'UTF8')::jsonb ->> 'loyalty_card' IS NOT NULL)",
            customer_id,
        )
        await self.conn.execute(
            "DELETE FROM outbox WHERE published_at IS NOT NULL AND payload IS NOT NULL"
            " AND convert_from(payload, 'UTF8')::jsonb ->> 'customer_id' = $1",
            customer_id,
        )
        return len(order_ids)

    # -- reads ----------------------------------------------------------------------------

    async def history(self, order_id: str) -> list[dict[str, Any]]:
        """What happened to an order, oldest first."""
        rows = await self.conn.fetch(
            "SELECT what, status, detail, at FROM order_history WHERE order_id = $1 ORDER BY id",
            order_id,
        )
        return [
            {"event": r["what"], "status": r["status"], "at": r["at"], **json.loads(r["detail"])}
            for r in rows
        ]

    async def returns(self, order_id: str) -> list[dict[str, Any]]:
        """The returns handed in for an order, oldest first."""
        rows = await self.conn.fetch(
            "SELECT return_id, location_id, channel, lines, not_accepted, refund, received_at"
            " FROM order_returns WHERE order_id = $1 ORDER BY received_at, return_id",
            order_id,
        )
        return [
            {
                "return_id": r["return_id"],
                "location_id": r["location_id"],
                "channel": r["channel"],
                "lines": json.loads(r["lines"]),
                "not_accepted": json.loads(r["not_accepted"]),
                "refund": r["refund"],
                "received_at": r["received_at"],
            }
            for r in rows
        ]

    async def for_customer(
        self, customer_id: str, *, limit: int, after: PageCursor | None = None
    ) -> list[Order]:
        """A customer's orders of every channel, newest first, after ``after``."""
        query = f"SELECT o.*, {_LINES_JSON} FROM orders o WHERE o.customer_id = $1"
        args: list[Any] = [customer_id]
        if after is not None:
            query += " AND (o.placed_at, o.order_id) < ($2, $3)"
            args += [after.placed_at, after.order_id]
        query += f" ORDER BY o.placed_at DESC, o.order_id DESC LIMIT ${len(args) + 1}"
        rows = await self.conn.fetch(query, *args, limit)
        return [_order(row, {}) for row in rows]

    async def count_by_status(self) -> dict[str, int]:
        """How many orders stand in each status."""
        rows = await self.conn.fetch("SELECT status, count(*) AS n FROM orders GROUP BY status")
        return {r["status"]: r["n"] for r in rows}


def _history_rows(order: Order) -> list[tuple[str, str, str, str]]:
    """What the order's pending events and notes add to its history."""
    rows: list[tuple[str, str, str, str]] = []
    for event in order.events:
        detail = event.model_dump(
            mode="json",
            exclude={"order_id", "customer_id", "channel", "status", "occurred_at"},
            exclude_none=True,
        )
        rows.append((order.order_id, event.ce_type, event.status.value, json.dumps(detail)))
    for what, text in order.notes:
        rows.append((order.order_id, what, order.status.value, json.dumps({"detail": text})))
    return rows


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as columns, for ``unnest`` (``width`` empty columns when there are none)."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def _json_models(models: Sequence[Any]) -> str:
    return json.dumps([m.model_dump(mode="json", exclude_none=True) for m in models])


def _order(row: Mapping[str, Any], returns: dict[str, str]) -> Order:
    lines = [
        OrderLine(
            line_no=ln["line_no"],
            sku=ln["sku"],
            qty=ln["qty"],
            unit_price=Decimal(ln["unit_price"]),
            returned_qty=ln["returned_qty"],
        )
        for ln in json.loads(row["lines"])
    ]
    return Order(
        order_id=row["order_id"],
        customer_id=row["customer_id"],
        channel=Channel(row["channel"]),
        status=OrderStatus(row["status"]),
        lines=lines,
        fulfillment=Fulfillment.model_validate_json(row["fulfillment"]),
        currency=row["currency"],
        total=row["total"],
        paid=row["paid"],
        placed_at=row["placed_at"],
        correlation_id=row["correlation_id"],
        checkout_id=row["checkout_id"],
        sale_id=row["sale_id"],
        cart_id=row["cart_id"],
        payment_reference=row["payment_reference"],
        points_to_redeem=row["points_to_redeem"],
        pending_confirmations=set(row["pending_confirmations"]),
        allocations=[Allocation.model_validate(a) for a in json.loads(row["allocations"])],
        shortages=[Shortage.model_validate(s) for s in json.loads(row["shortages"])],
        reason=row["reason"],
        carrier=row["carrier"],
        tracking_id=row["tracking_id"],
        promised_by=row["promised_by"],
        eta=row["eta"],
        announced_etas=set(row["announced_etas"]),
        collect_by=row["collect_by"],
        refunded=row["refunded"],
        returns=returns,
        version=row["version"],
    )
