"""Carts and their abandonment: project every cart change, fire once per contents.

A cart with items arms a durable timer one abandonment delay after its last activity; every
activity re-arms it; checkout, emptying or buying the items (any channel) disarms it. When
the timer fires, :func:`abandonment_due` decides (see
:func:`~customer_profile_service.domain.judge_abandonment`) and announces
``cart.abandoned`` through the outbox, in the timer's own transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from omni_common.service import Tx
from omni_common.timers import cancel_timer
from omni_contracts import (
    CartAbandoned,
    CartCheckedOut,
    CartEvent,
    CartViewed,
    Line,
    Money,
)
from omni_contracts.envelope import Envelope

from customer_profile_service.adapters.repository import CartRow
from customer_profile_service.domain import (
    Abandonment,
    IdKind,
    cart_value,
    check_cart,
    contents_hash,
    covered_by,
    is_blocked,
    judge_abandonment,
)
from customer_profile_service.service.context import CART_ABANDONMENT, Outcome, Profiles
from customer_profile_service.service.profiles import (
    arm,
    ensure_profile,
    publish_snapshots,
    resolve,
)
from customer_profile_service.service.purchases import cart_lines

log = logging.getLogger(__name__)


async def cart_changed(
    profiles: Profiles,
    tx: Tx,
    event: CartEvent,
    envelope: Envelope | None = None,
    *,
    now: datetime | None = None,
) -> Outcome:
    """Keep the whole cart as the channel sent it and (re)arm or disarm its timer.

    The owner is the customer the event names, else whoever the device is joined to, else
    nobody yet (an anonymous cart, adopted on ``customer.identified``). Refused: carts
    beyond the configured size (``cart_too_large``).
    """
    repo = profiles.repo(tx)
    out = Outcome()
    lines = cart_lines(event.items)
    check_cart(lines, profiles.cart_limits)
    # A login on this device or a checkout of this cart may be handled right now (other
    # topics): take turns, devices first, so each sees what the other committed.
    if event.anonymous_id:
        await repo.lock(profiles.lock_namespace, f"device:{event.anonymous_id}")
    await repo.lock(profiles.lock_namespace, f"cart:{event.cart_id}")
    owner: str | None = None
    if event.customer_id:
        owner = await ensure_profile(repo, event.customer_id, event.occurred_at, out)
        if owner is None:
            return out  # an erased shopper's cart: not kept
    elif event.anonymous_id and not is_blocked(event.anonymous_id, profiles.blocked):
        device_owner = await repo.owner(IdKind.ANONYMOUS_ID, event.anonymous_id)
        owner = await resolve(repo, device_owner) if device_owner else None
    # The timer row first, then the cart: the order in which a firing timer locks them.
    await repo.lock_timer(CART_ABANDONMENT, event.cart_id)
    cart = await repo.cart(event.cart_id, for_update=True)
    if owner is None and cart is not None:
        owner = cart.customer_id
    activity = min(event.occurred_at, now or profiles.clock())
    last = max(activity, cart.last_activity_at) if cart else activity
    if isinstance(event, CartCheckedOut):
        status = "checked_out"
    elif not lines:
        status = "emptied"
    elif (
        cart is not None
        and cart.status in ("checked_out", "purchased")
        and (isinstance(event, CartViewed) or event.occurred_at <= cart.last_activity_at)
    ):
        # Looking at a finished cart does not reopen it, nor does a change from before the
        # checkout that arrives after it (they travel on different topics).
        status = cart.status
        if lines and not isinstance(event, CartViewed):
            out.cart_skips.append(status)  # this change would have armed a reminder
    else:
        status = "open"
    await repo.save_cart(
        CartRow(
            cart_id=event.cart_id,
            customer_id=owner,
            anonymous_id=event.anonymous_id or (cart.anonymous_id if cart else None),
            channel=event.channel.value,
            status=status,
            items=lines,
            value=cart_value(lines),
            currency=lines[0].currency if lines else None,
            contents_hash=contents_hash(lines),
            announced_hash=cart.announced_hash if cart else None,
            last_activity_at=last,
            origin_id=event.customer_id,
        )
    )
    if status == "open":
        await arm(tx, event.cart_id, last + profiles.abandonment_delay)
    elif await cancel_timer(tx.conn, CART_ABANDONMENT, event.cart_id):
        out.cart_skips.append(status)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


async def abandonments_due(
    profiles: Profiles, tx: Tx, cart_ids: Sequence[str]
) -> list[tuple[Abandonment, str]]:
    """Carts whose timers fired (in their transaction): announce each or say why not.

    Decided together with a few set-based queries, since thousands may be due each second.
    Returns ``(verdict, channel)`` per cart id, in the order given.
    """
    repo = profiles.repo(tx)
    carts = await repo.carts_for_update(cart_ids)
    states = await repo.profile_states({c.customer_id for c in carts.values() if c.customer_id})
    owners: dict[str, str | None] = {}
    for cart in carts.values():
        owner = cart.customer_id
        if owner is None or owner not in states:
            owners[cart.cart_id] = None
        elif (merged_into := states[owner]) is not None:
            # Merges move carts to the survivor; this only catches one moved meanwhile.
            owners[cart.cart_id] = await resolve(repo, merged_into)
        else:
            owners[cart.cart_id] = owner
    live = {o for o in owners.values() if o is not None}
    since = min((c.last_activity_at for c in carts.values()), default=None)
    bought = await repo.purchases_since(live, since) if live and since else {}

    verdicts: list[tuple[Abandonment, str]] = []
    announced: list[tuple[str, str]] = []
    purchased: list[str] = []
    events: list[CartAbandoned] = []
    for cart_id in cart_ids:
        cart = carts.get(cart_id)
        if cart is None:
            verdicts.append((Abandonment(False, None), ""))
            continue
        owner = owners[cart_id]
        skus = {sku for sku, at in bought.get(owner or "", []) if at >= cart.last_activity_at}
        is_bought = owner is not None and covered_by((ln.sku for ln in cart.items), skus)
        # Erasure deletes a shopper's carts; this only catches a cart that outlived its owner.
        erased = (
            owner is None
            and cart.customer_id is not None
            and await repo.is_erased(cart.customer_id)
        )
        verdict = judge_abandonment(
            status=cart.status,
            owner=owner,
            erased=erased,
            hash_now=cart.contents_hash,
            announced_hash=cart.announced_hash,
            bought_after_activity=is_bought,
        )
        verdicts.append((verdict, cart.channel))
        if not verdict.announce:
            if is_bought and cart.status == "open":
                purchased.append(cart_id)
            continue
        assert owner is not None
        events.append(_abandoned(cart, owner))
        announced.append((cart_id, cart.contents_hash))
    if events:
        await tx.emit_all(events, correlation_ids=[e.cart_id for e in events])
    await repo.settle_carts(announced, purchased)
    return verdicts


def _abandoned(cart: CartRow, owner: str) -> CartAbandoned:
    assert cart.currency is not None
    return CartAbandoned(
        cart_id=cart.cart_id,
        customer_id=owner,
        channel=cart.channel,
        items=[
            Line(
                sku=ln.sku, qty=ln.qty, unit_price=Money(amount=ln.unit_price, currency=ln.currency)
            )
            for ln in cart.items
        ],
        value=Money(amount=Decimal(cart.value), currency=cart.currency),
        last_activity_at=cart.last_activity_at,
    )


def due_at(payload: dict[str, Any]) -> datetime | None:
    """The deadline a timer payload carries (for the lag metric), if any."""
    raw = payload.get("due_at")
    return datetime.fromisoformat(raw) if raw else None
