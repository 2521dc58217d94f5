"""Checkouts, orders and their later statuses, a lot at a time.

A checkout or an order makes its shopper known, ends its cart's abandonment and joins the
shopper's history. A lot's shoppers are resolved, created, written and snapshotted together,
one statement per table, so a busy checkout path costs a few statements per lot rather than
per order; a till sale (:mod:`~customer_profile_service.service.profiles`) uses the same
rule for carts bought and preferred stores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from omni_common.handlers import Lot
from omni_common.service import Tx
from omni_common.timers import cancel_timers
from omni_contracts import CheckoutSubmitted, FulfillmentType, Line, OrderEvent, OrderPlaced
from omni_contracts.envelope import Envelope

from customer_profile_service.adapters.repository import CartRow
from customer_profile_service.adapters.sets import ProfileSets, Purchase
from customer_profile_service.domain import CartLine, contents_hash, covered_by
from customer_profile_service.service.context import CART_ABANDONMENT, Outcome, Profiles
from customer_profile_service.service.identity import publish_live_snapshots, resolve


def cart_lines(lines: list[Line]) -> list[CartLine]:
    """Contract lines as domain lines."""
    return [CartLine(ln.sku, ln.qty, ln.unit_price.amount, ln.unit_price.currency) for ln in lines]


@dataclass(frozen=True)
class CheckedOut:
    """A cart that went through checkout, by whom, on which channel and when."""

    cart_id: str
    customer_id: str
    channel: str
    at: datetime
    origin_id: str
    """The customer id the event named: what an unmerge gives back."""


async def shoppers(
    profiles: Profiles, tx: Tx, named: Iterable[tuple[str, datetime]], out: Outcome
) -> dict[str, str | None]:
    """The live profile of every shopper named (with when), created if new; None for a
    shopper who was erased."""
    sets = ProfileSets(tx.conn)
    first_seen: dict[str, datetime] = {}
    for customer_id, at in named:
        first_seen.setdefault(customer_id, at)
    erased = await sets.erased_among(first_seen)
    live: dict[str, str | None] = dict.fromkeys(erased)
    # Any signal naming a shopper starts their profile; a late one may move its start back.
    created = await sets.create_profiles({i: at for i, at in first_seen.items() if i not in erased})
    out.changed |= created
    live.update((i, i) for i in created)
    known = await profiles.repo(tx).profile_states(i for i in first_seen if i not in live)
    for customer_id, merged_into in known.items():
        # Merged shoppers are rare: their chains are followed one profile at a time.
        live[customer_id] = (
            customer_id if merged_into is None else await resolve(profiles.repo(tx), merged_into)
        )
    return live


async def carts_checked_out(
    profiles: Profiles, tx: Tx, checked_out: list[CheckedOut], out: Outcome
) -> None:
    """Carts that went through checkout: their abandonment is off."""
    if not checked_out:
        return
    sets = ProfileSets(tx.conn)
    cart_ids = sorted({c.cart_id for c in checked_out})
    # A cart's own events arrive on another topic at the same time: serialised with them.
    await sets.lock_all(profiles.lock_namespace, [f"cart:{i}" for i in cart_ids])
    carts = await profiles.repo(tx).carts_for_update(cart_ids)
    first: dict[str, CheckedOut] = {}
    for c in checked_out:
        first.setdefault(c.cart_id, c)
    # A checkout that overtook its cart's events (another topic) leaves the cart remembered
    # as checked out, so those events arriving later do not arm a reminder.
    await sets.start_checked_out_carts(
        [_checked_out_cart(c) for i, c in first.items() if i not in carts]
    )
    await sets.set_cart_statuses(
        [i for i, c in carts.items() if c.status != "checked_out"], "checked_out"
    )
    cancelled = await cancel_timers(tx.conn, CART_ABANDONMENT, list(carts))
    out.cart_skips += ["checked_out"] * len(cancelled)


def _checked_out_cart(c: CheckedOut) -> CartRow:
    return CartRow(
        cart_id=c.cart_id,
        customer_id=c.customer_id,
        anonymous_id=None,
        channel=c.channel,
        status="checked_out",
        items=[],
        value=Decimal(0),
        currency=None,
        contents_hash=contents_hash([]),
        announced_hash=None,
        last_activity_at=c.at,
        origin_id=c.origin_id,
    )


async def after_purchases(
    profiles: Profiles, tx: Tx, last_purchase: dict[str, datetime], out: Outcome
) -> None:
    """Carts whose items were bought since their last activity need no reminder; preferred
    stores may have changed."""
    if not last_purchase:
        return
    sets = ProfileSets(tx.conn)
    carts = await sets.live_carts_before(last_purchase)
    if carts:
        since = min(c.last_activity_at for c in carts)
        shoppers_ = {c.customer_id for c in carts if c.customer_id}
        bought = await profiles.repo(tx).purchases_since(shoppers_, since)
        purchased = [
            c.cart_id
            for c in carts
            if covered_by(
                (ln.sku for ln in c.items), _since(bought, c.customer_id, c.last_activity_at)
            )
        ]
        await sets.set_cart_statuses(purchased, "purchased")
        cancelled = await cancel_timers(tx.conn, CART_ABANDONMENT, purchased)
        out.cart_skips += ["purchased"] * len(cancelled)
    out.changed |= await sets.prefer_stores(last_purchase)


def _since(
    bought: dict[str, list[tuple[str, datetime]]], customer_id: str | None, since: datetime
) -> set[str]:
    return {sku for sku, at in bought.get(customer_id or "", []) if at >= since}


# -- the handlers' use cases ------------------------------------------------------------------


async def checkouts_submitted(profiles: Profiles, tx: Tx, lot: Lot[CheckoutSubmitted]) -> Outcome:
    """Checkouts make their shoppers known and end their carts' abandonment."""
    out = Outcome()
    live = await shoppers(profiles, tx, ((c.customer_id, c.occurred_at) for c, _ in lot), out)
    checked_out: list[CheckedOut] = []
    causes: dict[str, Envelope] = {}
    for checkout, envelope in lot:
        customer_id = live[checkout.customer_id]
        if customer_id is None:
            continue  # an erased shopper: nothing of theirs is kept
        causes[customer_id] = envelope
        if checkout.cart_id:
            checked_out.append(
                CheckedOut(
                    checkout.cart_id,
                    customer_id,
                    checkout.channel.value,
                    checkout.occurred_at,
                    checkout.customer_id,
                )
            )
    await carts_checked_out(profiles, tx, checked_out, out)
    await publish_live_snapshots(tx, out.changed, out, causes)
    return out


async def orders_placed(profiles: Profiles, tx: Tx, lot: Lot[OrderPlaced]) -> Outcome:
    """Orders of any channel (till sales' included) join their shoppers' histories."""
    out = Outcome()
    sets = ProfileSets(tx.conn)
    # A till sale named only by its loyalty card was attributed from store.sales.v1:
    # its order id is remembered so its later events (returns) find it.
    await sets.link_orders(
        {f"sale:{o.sale_id}": o.order_id for o, _ in lot if o.customer_id is None and o.sale_id}
    )
    named = [(o, e) for o, e in lot if o.customer_id is not None]
    live = await shoppers(
        profiles, tx, ((o.customer_id or "", o.occurred_at) for o, _ in named), out
    )
    purchases: dict[str, Purchase] = {}
    checked_out: list[CheckedOut] = []
    last_purchase: dict[str, datetime] = {}
    causes: dict[str, Envelope] = {}
    for order, envelope in named:
        customer_id = live[order.customer_id or ""]
        if customer_id is None:
            continue
        key = f"sale:{order.sale_id}" if order.sale_id else order.order_id
        ful = order.fulfillment
        total = order.total.amount if order.total else sum(ln.total().amount for ln in order.lines)
        if (earlier := purchases.get(key)) is not None:
            # As recorded one by one: the first stays, taking the newest status.
            purchases[key] = replace(
                earlier, order_id=earlier.order_id or order.order_id, status=order.status.value
            )
        else:
            purchases[key] = Purchase(
                purchase_key=key,
                order_id=order.order_id,
                customer_id=customer_id,
                channel=order.channel.value,
                status=order.status.value,
                lines=cart_lines(order.lines),
                total=Decimal(total),
                currency=order.lines[0].unit_price.currency,
                location_id=ful.location_id if ful.type is FulfillmentType.PICKUP else None,
                placed_at=order.occurred_at,
                origin_id=order.customer_id or customer_id,
            )
        if order.cart_id:
            checked_out.append(
                CheckedOut(
                    order.cart_id,
                    customer_id,
                    order.channel.value,
                    order.occurred_at,
                    order.customer_id or customer_id,
                )
            )
        last_purchase[customer_id] = max(
            order.occurred_at, last_purchase.get(customer_id, order.occurred_at)
        )
        causes[customer_id] = envelope
    await sets.record_purchases(list(purchases.values()))
    await carts_checked_out(profiles, tx, checked_out, out)
    await after_purchases(profiles, tx, last_purchase, out)
    await publish_live_snapshots(tx, out.changed, out, causes)
    return out


async def orders_moved(profiles: Profiles, tx: Tx, lot: Lot[OrderEvent]) -> Outcome:
    """Orders' statuses changed: their history entries follow (unknown orders: nothing).

    An order's events arrive in order (keyed by order), so its last one in the lot wins.
    """
    await ProfileSets(tx.conn).set_purchase_statuses({e.order_id: e.status.value for e, _ in lot})
    return Outcome()
