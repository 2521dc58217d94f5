"""The loyalty service's SQL: accounts, the ledger, earnings, holds, cards, spend, offers.

Every method runs on the caller's connection, inside the caller's transaction. Accounts are
locked (``FOR UPDATE``) before their buckets change, so concurrent changes of one account
queue up and every ledger entry's ``balance`` is exact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from loyalty_service.domain.model import Account, Buckets, EarnedLine, EntryKind

_ACCOUNT_COLUMNS = (
    "account_id, customer_id, available, pending, held, lifetime, tier, tier_review_at,"
    " preferred_store, last_activity_at, erased_at IS NOT NULL AS erased"
)


# The account a customer id names: an erased shopper's id names their pseudonymised account,
# a merged id the account its points went to (until an unmerge gives it back its own).
def _named(customer_id: str) -> str:
    """SQL for the ``customer_id`` of the account the id ``customer_id`` (SQL) names."""
    return (
        "coalesce((SELECT 'erased:' || e.account_id FROM erased_customers e"
        f" WHERE e.customer_id = {customer_id}),"
        " (SELECT i.customer_id FROM merged_customers m"
        " JOIN accounts i ON i.account_id = m.into_account"
        f" WHERE m.customer_id = {customer_id}), {customer_id})"
    )


# No account is opened under an id that is erased or merged (it names another account).
_NAMED_ELSEWHERE = (
    "EXISTS (SELECT 1 FROM erased_customers e WHERE e.customer_id = {0})"
    " OR EXISTS (SELECT 1 FROM merged_customers m WHERE m.customer_id = {0})"
)


def _account(row: asyncpg.Record | None) -> Account | None:
    return Account(**dict(row)) if row is not None else None


@dataclass(frozen=True)
class Entry:
    """One ledger entry as written."""

    entry_id: int
    kind: EntryKind
    points: int
    balance: int
    reason: str
    order_id: str | None
    occurred_at: datetime


@dataclass
class OrderRecord:
    """An order as loyalty keeps it."""

    order_id: str
    account_id: int | None
    channel: str
    currency: str
    gross: Decimal
    lines: list[dict[str, Any]]
    points_to_redeem: int | None
    redeemed: int
    given_back: int
    returned_value: Decimal
    origin_account: int | None = None


@dataclass
class Earning:
    """Points earned on one order."""

    order_id: str
    account_id: int
    points: int
    reversed: int
    lines: list[EarnedLine]
    returned: dict[str, int]
    status: str
    origin_account: int | None = None


class LoyaltyRepository:
    """The loyalty tables, on one connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    # -- accounts ------------------------------------------------------------------------

    async def account(self, account_id: int) -> Account:
        """The account, locked until commit."""
        row = await self.conn.fetchrow(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 FOR UPDATE",
            account_id,
        )
        account = _account(row)
        assert account is not None
        return account

    async def customer_account(self, customer_id: str, *, lock: bool = True) -> Account | None:
        """The customer's account (locked unless ``lock`` is False), or None; an erased
        shopper's is their pseudonymised account, marked erased."""
        return _account(
            await self.conn.fetchrow(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE customer_id = {_named('$1')}"
                + (" FOR UPDATE" if lock else ""),
                customer_id,
            )
        )

    async def ensure_customer_account(self, customer_id: str) -> Account:
        """The customer's account, opened with no points if there is none; locked. An
        erased shopper's is their pseudonymised account (marked erased), never a new one."""
        account = await self.customer_account(customer_id)
        if account is not None:
            return account
        await self.conn.execute(
            "INSERT INTO accounts (customer_id) SELECT $1::text"
            f" WHERE NOT ({_NAMED_ELSEWHERE.format('$1')})"
            " ON CONFLICT (customer_id) DO NOTHING",
            customer_id,
        )
        account = await self.customer_account(customer_id)
        assert account is not None
        return account

    async def ensure_customer_accounts(self, customer_ids: Sequence[str]) -> dict[str, Account]:
        """The customers' accounts, opened with no points where there is none; locked, in
        account order (two statements for any number of customers). An erased shopper's is
        their pseudonymised account (marked erased), never a new one."""
        wanted = sorted(set(customer_ids))
        if not wanted:
            return {}
        await self.conn.execute(
            "INSERT INTO accounts (customer_id) SELECT w FROM unnest($1::text[]) AS w"
            f" WHERE NOT ({_NAMED_ELSEWHERE.format('w')})"
            " ORDER BY 1 ON CONFLICT (customer_id) DO NOTHING",
            wanted,
        )
        rows = await self.conn.fetch(
            f"SELECT w.id AS wanted, {_ACCOUNT_COLUMNS} FROM unnest($1::text[]) AS w(id)"
            f" JOIN accounts ON customer_id = {_named('w.id')}"
            " ORDER BY account_id FOR UPDATE OF accounts",
            wanted,
        )
        return {
            row["wanted"]: Account(**{k: v for k, v in row.items() if k != "wanted"})
            for row in rows
        }

    async def origins(self, customer_ids: Sequence[str]) -> dict[str, int]:
        """Of ``customer_ids``, the merged ones (not erased), each with its own account: what
        they do now posts on the survivor's account as that account's (``origin_account``)."""
        rows = await self.conn.fetch(
            "SELECT m.customer_id, m.account_id FROM merged_customers m"
            " WHERE m.customer_id = ANY($1::text[]) AND NOT EXISTS"
            " (SELECT 1 FROM erased_customers e WHERE e.customer_id = m.customer_id)",
            sorted(set(customer_ids)),
        )
        return {r["customer_id"]: r["account_id"] for r in rows}

    async def origin(self, customer_id: str | None) -> int | None:
        """The merged id's own account (see :meth:`origins`), or None."""
        if customer_id is None:
            return None
        return (await self.origins([customer_id])).get(customer_id)

    async def merged_customer(self, customer_id: str) -> tuple[int, int] | None:
        """``(its own account, the account its points went to)`` of a merged id (locked), or
        None when the id is not merged (or was merged before merges were kept)."""
        row = await self.conn.fetchrow(
            "SELECT account_id, into_account FROM merged_customers WHERE customer_id = $1"
            " FOR UPDATE",
            customer_id,
        )
        return (row["account_id"], row["into_account"]) if row else None

    async def erased_account(self, customer_id: str) -> int | None:
        """The pseudonymised account an erased id names, or None when it is not erased."""
        return await self.conn.fetchval(
            "SELECT account_id FROM erased_customers WHERE customer_id = $1", customer_id
        )

    async def share(self, account_id: int, origin: int) -> Buckets:
        """What the entries on ``account_id`` attributed to ``origin`` add up to, per bucket."""
        row = await self.conn.fetchrow(
            "SELECT coalesce(sum(available_delta), 0) AS available,"
            " coalesce(sum(pending_delta), 0) AS pending, coalesce(sum(held_delta), 0) AS held,"
            " coalesce(sum(lifetime_delta), 0) AS lifetime FROM ledger"
            " WHERE account_id = $1 AND origin_account = $2",
            account_id,
            origin,
        )
        return Buckets(
            available=int(row["available"]),
            pending=int(row["pending"]),
            held=int(row["held"]),
            lifetime=int(row["lifetime"]),
        )

    async def set_preferred_stores(self, stores: Mapping[int, str | None]) -> None:
        """Remember where each shopper likes to shop (offers check stock there)."""
        if stores:
            await self.conn.execute(
                "UPDATE accounts a SET preferred_store = v.store"
                " FROM unnest($1::bigint[], $2::text[]) AS v(account_id, store)"
                " WHERE a.account_id = v.account_id",
                list(stores),
                list(stores.values()),
            )

    async def card_account(self, card: str) -> tuple[Account, int | None]:
        """The account a card collects on (its customer's once linked, else its own), with
        the merged account the card came from (its sales are that account's), or None."""
        row = await self.conn.fetchrow(
            "SELECT account_id, merged_from FROM cards WHERE card = $1", card
        )
        if row is not None:
            return await self.account(row["account_id"]), row["merged_from"]
        account_id = await self.conn.fetchval(
            "INSERT INTO accounts (customer_id) VALUES (NULL) RETURNING account_id"
        )
        inserted = await self.conn.fetchval(
            "INSERT INTO cards (card, account_id) VALUES ($1, $2)"
            " ON CONFLICT (card) DO NOTHING RETURNING account_id",
            card,
            account_id,
        )
        if inserted is None:  # another transaction registered the card meanwhile
            return await self.card_account(card)
        return await self.account(account_id), None

    async def card(self, card: str) -> tuple[int, str | None] | None:
        """``(account_id, customer_id)`` of a known card (locked), or None."""
        row = await self.conn.fetchrow(
            "SELECT c.account_id, a.customer_id FROM cards c"
            " JOIN accounts a USING (account_id) WHERE c.card = $1 FOR UPDATE OF c",
            card,
        )
        return (row["account_id"], row["customer_id"]) if row else None

    async def claim_card(self, card: str, account_id: int) -> bool:
        """Register a new card for ``account_id``; False if the card is known (the insert
        waits for a concurrent one, so the caller can then read the winner's row)."""
        return bool(
            await self.conn.fetchval(
                "INSERT INTO cards (card, account_id, linked_at) VALUES ($1, $2, now())"
                " ON CONFLICT (card) DO NOTHING RETURNING true",
                card,
                account_id,
            )
        )

    async def link_card(self, card: str, account_id: int) -> None:
        """Point ``card`` at ``account_id`` from now on."""
        await self.conn.execute(
            "INSERT INTO cards (card, account_id, linked_at) VALUES ($1, $2, now())"
            " ON CONFLICT (card) DO UPDATE SET account_id = EXCLUDED.account_id,"
            " linked_at = now()",
            card,
            account_id,
        )

    async def move_belongings(self, source: int, target: int, *, attributed: bool = False) -> None:
        """Re-home what an account owns (earnings, orders, holds...) to ``target``; when
        ``attributed`` (a merge), orders, earnings, holds and spend remember ``source`` as
        their origin, so what settles them later is the merged account's."""
        for table in ("earnings", "orders", "holds", "spend"):
            await self.conn.execute(
                f"UPDATE {table} SET account_id = $2, origin_account = CASE WHEN $3"
                " THEN coalesce(origin_account, $1) ELSE origin_account END"
                " WHERE account_id = $1",
                source,
                target,
                attributed,
            )
        await self.conn.execute(
            "UPDATE offers SET account_id = $2 WHERE account_id = $1", source, target
        )
        await self.conn.execute(
            "INSERT INTO purchases (account_id, sku) SELECT $2, sku FROM purchases"
            " WHERE account_id = $1 ON CONFLICT DO NOTHING",
            source,
            target,
        )
        await self.conn.execute("DELETE FROM purchases WHERE account_id = $1", source)

    async def set_preferred_store(self, account_id: int, store: str | None) -> None:
        """Remember where the shopper likes to shop (offers check stock there)."""
        await self.conn.execute(
            "UPDATE accounts SET preferred_store = $2 WHERE account_id = $1", account_id, store
        )

    async def set_tier(self, account_id: int, tier: str, review_at: datetime | None) -> None:
        """Move the account to ``tier``, next reviewed at ``review_at``."""
        await self.conn.execute(
            "UPDATE accounts SET tier = $2, tier_review_at = $3, updated_at = now()"
            " WHERE account_id = $1",
            account_id,
            tier,
            review_at,
        )

    async def touch(self, account_id: int, at: datetime) -> None:
        """The shopper was active (expiry counts from here)."""
        await self.conn.execute(
            "UPDATE accounts SET last_activity_at = GREATEST(last_activity_at, $2)"
            " WHERE account_id = $1",
            account_id,
            at,
        )

    async def retire(self, customer_id: str, account_id: int | None, into: int) -> None:
        """A merged id: its account (an empty one opened if it had none) is renamed, its cards
        collect for the survivor, and ``merged_customers`` keeps the id, its account and
        where its points went, so later events naming it post there and an unmerge can give
        back what was its own. Ids merged into it before now follow it to ``into``."""
        if account_id is None:
            account_id = await self.conn.fetchval(
                "INSERT INTO accounts (account_id, customer_id)"
                " SELECT id, 'merged:' || id"
                " FROM (SELECT nextval(pg_get_serial_sequence('accounts', 'account_id')) AS id) n"
                " RETURNING account_id"
            )
        else:
            await self.conn.execute(
                "UPDATE accounts SET customer_id = 'merged:' || account_id, updated_at = now()"
                " WHERE account_id = $1",
                account_id,
            )
            await self.conn.execute(
                "UPDATE cards SET account_id = $2, merged_from = $1 WHERE account_id = $1",
                account_id,
                into,
            )
        await self.conn.execute(
            "UPDATE merged_customers SET into_account = $2 WHERE into_account = $1",
            account_id,
            into,
        )
        await self.conn.execute(
            "INSERT INTO merged_customers (customer_id, account_id, into_account)"
            " VALUES ($1, $2, $3) ON CONFLICT (customer_id) DO NOTHING",
            customer_id,
            account_id,
            into,
        )

    async def move_back(self, source: int, origin: int, target: int) -> None:
        """An unmerge: what ``source`` holds as ``origin``'s (orders, earnings, holds, spend)
        goes to ``target``, as its own; cards that came from ``origin`` collect for it again
        (unless ``target`` is not ``origin``: an erased shopper's cards are dropped)."""
        for table in ("earnings", "orders", "holds", "spend"):
            await self.conn.execute(
                f"UPDATE {table} SET account_id = $3, origin_account = NULL"
                " WHERE account_id = $1 AND origin_account = $2",
                source,
                origin,
                target,
            )
        if target == origin:
            await self.conn.execute(
                "UPDATE cards SET account_id = $2, merged_from = NULL"
                " WHERE account_id = $1 AND merged_from = $2",
                source,
                origin,
            )
        else:
            await self.conn.execute(
                "DELETE FROM cards WHERE account_id = $1 AND merged_from = $2", source, origin
            )

    async def restore(self, customer_id: str, account_id: int | None) -> None:
        """The merged id is its own again: no longer merged, its account (if given) named
        after it again."""
        await self.conn.execute("DELETE FROM merged_customers WHERE customer_id = $1", customer_id)
        if account_id is not None:
            await self.conn.execute(
                "UPDATE accounts SET customer_id = $2, updated_at = now() WHERE account_id = $1",
                account_id,
                customer_id,
            )

    async def erase(self, customer_id: str) -> int | None:
        """Pseudonymise a shopper: the account keeps its ledger, loses the name and cards.

        Returns the account's id, None when the shopper had none (or was erased before).
        Either way the id is remembered as erased, with an empty pseudonymised account if
        there was none, so no later event opens an account under it again.
        """
        account_id = await self.conn.fetchval(
            "UPDATE accounts SET customer_id = 'erased:' || account_id, preferred_store = NULL,"
            " erased_at = now(), updated_at = now() WHERE customer_id = $1 RETURNING account_id",
            customer_id,
        )
        if account_id is not None:
            await self.conn.execute("DELETE FROM cards WHERE account_id = $1", account_id)
            pointed_at = account_id
        elif await self.conn.fetchval(
            "SELECT true FROM erased_customers WHERE customer_id = $1", customer_id
        ):
            return None  # erased before
        else:
            # No account yet: an empty pseudonymised one for the id to name.
            pointed_at = await self.conn.fetchval(
                "INSERT INTO accounts (account_id, customer_id, erased_at)"
                " SELECT id, 'erased:' || id, now()"
                " FROM (SELECT nextval(pg_get_serial_sequence('accounts', 'account_id')) AS id) n"
                " RETURNING account_id"
            )
        await self.conn.execute(
            "INSERT INTO erased_customers (customer_id, account_id) VALUES ($1, $2)"
            " ON CONFLICT (customer_id) DO NOTHING",
            customer_id,
            pointed_at,
        )
        return account_id

    # -- the ledger ----------------------------------------------------------------------

    async def post(
        self,
        account: Account,
        kind: EntryKind,
        change: Buckets,
        *,
        points: int,
        reason: str,
        cause: str,
        order_id: str | None = None,
        at: datetime,
        origin: int | None = None,
    ) -> Entry | None:
        """Append an entry and apply its change to the (locked) account; None when an entry
        with this ``cause`` exists (a redelivery or resend: no second effect). ``origin``:
        the (merged) account whose points these are, when not the account's own.

        The account's CHECKs refuse any change that would make a bucket negative.
        """
        balance = account.available + change.available
        row = await self.conn.fetchrow(
            "INSERT INTO ledger (account_id, kind, points, available_delta, pending_delta,"
            " held_delta, balance, reason, order_id, cause, occurred_at, lifetime_delta,"
            " origin_account)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            " ON CONFLICT (cause) DO NOTHING RETURNING entry_id",
            account.account_id,
            kind.value,
            points,
            change.available,
            change.pending,
            change.held,
            balance,
            reason,
            order_id,
            cause,
            at,
            change.lifetime,
            origin if origin != account.account_id else None,
        )
        if row is None:
            return None
        await self.conn.execute(
            "UPDATE accounts SET available = available + $2, pending = pending + $3,"
            " held = held + $4, lifetime = lifetime + $5, updated_at = now()"
            " WHERE account_id = $1",
            account.account_id,
            change.available,
            change.pending,
            change.held,
            change.lifetime,
        )
        account.available = balance
        account.pending += change.pending
        account.held += change.held
        account.lifetime += change.lifetime
        return Entry(row["entry_id"], kind, points, balance, reason, order_id, at)

    async def entries(
        self, account_id: int, *, limit: int, before: int | None
    ) -> list[dict[str, Any]]:
        """A page of an account's entries, newest first."""
        rows = await self.conn.fetch(
            "SELECT entry_id, kind, points, available_delta, pending_delta, held_delta, balance,"
            " reason, order_id, occurred_at FROM ledger"
            " WHERE account_id = $1 AND ($2::bigint IS NULL OR entry_id < $2)"
            " ORDER BY entry_id DESC LIMIT $3",
            account_id,
            before,
            limit,
        )
        return [dict(r) for r in rows]

    # -- orders, earnings, holds ---------------------------------------------------------

    async def add_order(self, order: OrderRecord) -> bool:
        """Remember an order as placed; False if it was known already."""
        inserted = await self.conn.fetchval(
            "INSERT INTO orders (order_id, account_id, channel, currency, gross, lines,"
            " points_to_redeem, origin_account) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)"
            " ON CONFLICT (order_id) DO NOTHING RETURNING true",
            order.order_id,
            order.account_id,
            order.channel,
            order.currency,
            order.gross,
            json.dumps(order.lines),
            order.points_to_redeem,
            order.origin_account,
        )
        return bool(inserted)

    async def add_orders(self, orders: Sequence[OrderRecord]) -> set[str]:
        """Remember orders as placed; returns the ids of those not known before."""
        if not orders:
            return set()
        rows = await self.conn.fetch(
            "INSERT INTO orders (order_id, account_id, channel, currency, gross, lines,"
            " points_to_redeem, origin_account) SELECT o.order_id, o.account_id, o.channel,"
            " o.currency, o.gross, o.lines::jsonb, o.points_to_redeem, o.origin_account"
            " FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::numeric[],"
            " $6::text[], $7::int[], $8::bigint[]) AS o(order_id, account_id, channel, currency,"
            " gross, lines, points_to_redeem, origin_account)"
            " ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
            [o.order_id for o in orders],
            [o.account_id for o in orders],
            [o.channel for o in orders],
            [o.currency for o in orders],
            [o.gross for o in orders],
            [json.dumps(o.lines) for o in orders],
            [o.points_to_redeem for o in orders],
            [o.origin_account for o in orders],
        )
        return {r["order_id"] for r in rows}

    async def holds(self, order_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
        """The holds of these orders (locked), by order."""
        rows = await self.conn.fetch(
            "SELECT order_id, account_id, points, status, origin_account FROM holds"
            " WHERE order_id = ANY($1::text[]) ORDER BY order_id FOR UPDATE",
            list(order_ids),
        )
        return {r["order_id"]: r for r in rows}

    async def order(self, order_id: str) -> OrderRecord | None:
        """An order loyalty saw placed (locked), or None."""
        row = await self.conn.fetchrow(
            "SELECT order_id, account_id, channel, currency, gross, lines, points_to_redeem,"
            " redeemed, given_back, returned_value, origin_account FROM orders"
            " WHERE order_id = $1 FOR UPDATE",
            order_id,
        )
        if row is None:
            return None
        values = dict(row)
        values["lines"] = json.loads(values["lines"])
        return OrderRecord(**values)

    async def save_order_returns(self, order: OrderRecord) -> None:
        """Write back what was redeemed, given back and returned on an order."""
        await self.conn.execute(
            "UPDATE orders SET redeemed = $2, given_back = $3, returned_value = $4"
            " WHERE order_id = $1",
            order.order_id,
            order.redeemed,
            order.given_back,
            order.returned_value,
        )

    async def add_earning(
        self,
        order_id: str,
        account_id: int,
        lines: list[EarnedLine],
        available_at: datetime,
        origin: int | None = None,
    ) -> bool:
        """Record points earned on an order; False if it earned before."""
        inserted = await self.conn.fetchval(
            "INSERT INTO earnings (order_id, account_id, points, lines, status, available_at,"
            " origin_account) VALUES ($1, $2, $3, $4::jsonb, 'pending', $5, $6)"
            " ON CONFLICT (order_id) DO NOTHING RETURNING true",
            order_id,
            account_id,
            sum(line.points for line in lines),
            json.dumps(
                [
                    {"sku": ln.sku, "qty": ln.qty, "value": str(ln.value), "points": ln.points}
                    for ln in lines
                ]
            ),
            available_at,
            origin,
        )
        return bool(inserted)

    async def earning(self, order_id: str) -> Earning | None:
        """The points earned on an order (locked), or None."""
        row = await self.conn.fetchrow(
            "SELECT order_id, account_id, points, reversed, lines, returned, status,"
            " origin_account FROM earnings WHERE order_id = $1 FOR UPDATE",
            order_id,
        )
        if row is None:
            return None
        lines = [
            EarnedLine(ln["sku"], ln["qty"], Decimal(ln["value"]), ln["points"])
            for ln in json.loads(row["lines"])
        ]
        return Earning(
            order_id=row["order_id"],
            account_id=row["account_id"],
            points=row["points"],
            reversed=row["reversed"],
            lines=lines,
            returned=json.loads(row["returned"]),
            status=row["status"],
            origin_account=row["origin_account"],
        )

    async def save_earning(self, earning: Earning) -> None:
        """Write back an earning's status and what of it was reversed."""
        await self.conn.execute(
            "UPDATE earnings SET reversed = $2, returned = $3::jsonb, status = $4"
            " WHERE order_id = $1",
            earning.order_id,
            earning.reversed,
            json.dumps(earning.returned),
            earning.status,
        )

    async def add_hold(
        self, order_id: str, account_id: int, points: int, origin: int | None = None
    ) -> bool:
        """Record a hold; False if the order held before."""
        return bool(
            await self.conn.fetchval(
                "INSERT INTO holds (order_id, account_id, points, status, origin_account)"
                " VALUES ($1, $2, $3, 'held', $4) ON CONFLICT (order_id) DO NOTHING"
                " RETURNING true",
                order_id,
                account_id,
                points,
                origin,
            )
        )

    async def hold(self, order_id: str) -> asyncpg.Record | None:
        """An order's hold (locked): account_id, points, status; or None."""
        return await self.conn.fetchrow(
            "SELECT order_id, account_id, points, status, origin_account FROM holds"
            " WHERE order_id = $1 FOR UPDATE",
            order_id,
        )

    async def settle_hold(self, order_id: str, status: str) -> None:
        """Mark a hold redeemed or released."""
        await self.conn.execute(
            "UPDATE holds SET status = $2, settled_at = now() WHERE order_id = $1",
            order_id,
            status,
        )

    # -- spend and tiers -----------------------------------------------------------------

    async def add_spend(
        self,
        account_id: int,
        cause: str,
        amount: Decimal,
        at: datetime,
        origin: int | None = None,
    ) -> None:
        """Count qualifying spend (negative for a return), once per cause."""
        await self.conn.execute(
            "INSERT INTO spend (account_id, cause, amount, at, origin_account)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (cause) DO NOTHING",
            account_id,
            cause,
            amount,
            at,
            origin,
        )

    async def spend_since(self, account_id: int, since: datetime) -> Decimal:
        """Qualifying spend since ``since``."""
        total = await self.conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM spend WHERE account_id = $1 AND at >= $2",
            account_id,
            since,
        )
        return Decimal(total)

    # -- offers --------------------------------------------------------------------------

    async def record_basket(self, account_id: int | None, pairs: list[tuple[str, str]]) -> None:
        """Count SKUs bought together."""
        if pairs:
            await self.conn.executemany(
                "INSERT INTO cooccurrence (sku, other_sku, n) VALUES ($1, $2, 1)"
                " ON CONFLICT (sku, other_sku) DO UPDATE SET n = cooccurrence.n + 1",
                pairs,
            )

    async def record_purchases(self, account_id: int, skus: list[str]) -> None:
        """Remember what the shopper bought."""
        await self.conn.executemany(
            "INSERT INTO purchases (account_id, sku) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(account_id, sku) for sku in sorted(set(skus))],
        )

    async def bought_together(self, skus: list[str], limit: int = 50) -> list[tuple[str, int]]:
        """SKUs most often bought with ``skus`` (not among them), best first."""
        rows = await self.conn.fetch(
            "SELECT other_sku, sum(n)::int AS n FROM cooccurrence"
            " WHERE sku = ANY($1::text[]) AND NOT other_sku = ANY($1::text[])"
            " GROUP BY other_sku ORDER BY n DESC, other_sku LIMIT $2",
            skus,
            limit,
        )
        return [(r["other_sku"], r["n"]) for r in rows]

    async def bought(self, account_id: int) -> list[str]:
        """Every SKU the shopper bought."""
        rows = await self.conn.fetch("SELECT sku FROM purchases WHERE account_id = $1", account_id)
        return [r["sku"] for r in rows]

    async def in_stock(self, skus: list[str], store: str | None) -> list[str]:
        """Of ``skus``, those sellable online or available at ``store``."""
        rows = await self.conn.fetch(
            "SELECT DISTINCT ON (sku) sku FROM stock WHERE sku = ANY($1::text[])"
            " AND (online_available > 0 OR ($2::text IS NOT NULL AND location_id = $2"
            " AND available > 0)) ORDER BY sku",
            skus,
            store,
        )
        return [r["sku"] for r in rows]

    async def record_stocks(self, changes: Sequence[tuple[str, str, int, int, datetime]]) -> None:
        """Keep the newest stock figure of each ``(sku, location_id, available, online,
        changed_at)``, and each SKU's newest ``online_available`` on all its rows: two
        statements for any number of changes."""
        newest: dict[tuple[str, str], tuple[str, str, int, int, datetime]] = {}
        for change in changes:
            key = (change[0], change[1])
            if key not in newest or newest[key][4] <= change[4]:
                newest[key] = change
        online: dict[str, tuple[int, datetime]] = {}
        for sku, _, _, on, at in newest.values():
            if sku not in online or online[sku][1] <= at:
                online[sku] = (on, at)
        rows = sorted(newest.values())
        await self.conn.execute(
            "INSERT INTO stock (sku, location_id, available, online_available, changed_at)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[],"
            " $5::timestamptz[]) ON CONFLICT (sku, location_id) DO UPDATE SET"
            " available = EXCLUDED.available, online_available = EXCLUDED.online_available,"
            " changed_at = EXCLUDED.changed_at WHERE stock.changed_at <= EXCLUDED.changed_at",
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [r[4] for r in rows],
        )
        await self.conn.execute(
            "UPDATE stock t SET online_available = o.online"
            " FROM unnest($1::text[], $2::int[], $3::timestamptz[]) AS o(sku, online, at)"
            " WHERE t.sku = o.sku AND t.changed_at <= o.at",
            list(online),
            [v[0] for v in online.values()],
            [v[1] for v in online.values()],
        )

    async def open_offer(self, account_id: int, now: datetime) -> asyncpg.Record | None:
        """The shopper's offer still valid at ``now``, if any."""
        return await self.conn.fetchrow(
            "SELECT offer_id, sku, reward, valid_until FROM offers"
            " WHERE account_id = $1 AND valid_until > $2 ORDER BY valid_until DESC LIMIT 1",
            account_id,
            now,
        )

    async def add_offer(
        self, offer_id: str, account_id: int, sku: str, reward: str, valid: timedelta, now: datetime
    ) -> datetime:
        """Issue an offer; returns until when it is valid."""
        until = now + valid
        await self.conn.execute(
            "INSERT INTO offers (offer_id, account_id, sku, reward, valid_until, issued_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            offer_id,
            account_id,
            sku,
            reward,
            until,
            now,
        )
        return until
