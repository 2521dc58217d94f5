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

    # -- idempotency ----------------------------------------------------------------------

    async def lock_key(self, key: str) -> IdempotencyRecord | None:
        """Serialise work on an idempotency key (until commit) and return its record, if any.

        Two submissions of one checkout racing (topic and HTTP) queue here, so the second
        sees the first one's order instead of creating another.
        """
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)
        row = await self.conn.fetchrow(
            "SELECT request_hash, order_id FROM idempotency_keys WHERE key = $1", key
        )
        return IdempotencyRecord(row["request_hash"], row["order_id"]) if row else None

    async def remember_key(self, key: str, request_hash: str, order_id: str) -> None:
        """Record that ``key`` (with this request hash) created ``order_id``."""
        await self.conn.execute(
            "INSERT INTO idempotency_keys (key, request_hash, order_id) VALUES ($1, $2, $3)",
            key,
            request_hash,
            order_id,
        )

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

    async def add(self, order: Order) -> None:
        """Insert a new order with its lines."""
        await self.conn.execute(
            "INSERT INTO orders (order_id, customer_id, channel, status, fulfillment, currency,"
            " total, paid, correlation_id, checkout_id, sale_id, cart_id, payment_reference,"
            " points_to_redeem, pending_confirmations, placed_at)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,"
            " $16)",
            order.order_id,
            order.customer_id,
            order.channel.value,
            order.status.value,
            order.fulfillment.model_dump_json(exclude_none=True),
            order.currency,
            order.total,
            order.paid,
            order.correlation_id,
            order.checkout_id,
            order.sale_id,
            order.cart_id,
            order.payment_reference,
            order.points_to_redeem,
            sorted(order.pending_confirmations),
            order.placed_at,
        )
        await self.conn.executemany(
            "INSERT INTO order_lines (order_id, line_no, sku, qty, unit_price)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(order.order_id, ln.line_no, ln.sku, ln.qty, ln.unit_price) for ln in order.lines],
        )
        await self._record_history(order)

    async def save(self, order: Order) -> None:
        """Write back a loaded order's changes (status, saga, fulfilment, returns)."""
        await self.conn.execute(
            "UPDATE orders SET status = $2, pending_confirmations = $3, allocations = $4::jsonb,"
            " shortages = $5::jsonb, reason = $6, carrier = $7, tracking_id = $8,"
            " promised_by = $9, eta = $10, announced_etas = $11, collect_by = $12,"
            " refunded = $13, paid = $14, updated_at = now(), version = version + 1"
            " WHERE order_id = $1",
            order.order_id,
            order.status.value,
            sorted(order.pending_confirmations),
            json.dumps([a.model_dump(mode="json") for a in order.allocations]),
            json.dumps([s.model_dump(mode="json") for s in order.shortages]),
            order.reason,
            order.carrier,
            order.tracking_id,
            order.promised_by,
            order.eta,
            sorted(order.announced_etas),
            order.collect_by,
            order.refunded,
            order.paid,
        )
        if order.new_returns:
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
        await self._record_history(order)

    async def _record_history(self, order: Order) -> None:
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
        if rows:
            await self.conn.executemany(
                "INSERT INTO order_history (order_id, what, status, detail, at)"
                " VALUES ($1, $2, $3, $4::jsonb, clock_timestamp())",
                rows,
            )

    # -- erasure --------------------------------------------------------------------------

    async def erase_customer(self, customer_id: str) -> int:
        """Pseudonymise a shopper's orders after an erasure; returns how many orders.

        Delivery addresses (with the recipient's name and phone) leave the orders, their
        history and the published outbox rows; ids, lines, amounts and states stay, as the
        accounts require.
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
                "UPDATE order_history SET detail = detail #- '{fulfillment,address}'"
                " WHERE order_id = ANY($1::text[])",
                order_ids,
            )
        # Unpublished rows are left to the relay (deleting them would lose order events).
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
