"""Carts and their abandonment: project every cart change, fire once per contents.

A cart with items arms a durable timer one abandonment delay after its last activity; every
activity re-arms it; checkout, emptying or buying the items (any channel) disarms it. When
the timer fires, :func:`abandonment_due` decides (see
:func:`~customer_profile_service.domain.judge_abandonment`) and announces
``cart.abandoned`` through the outbox, in the timer's own transaction.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
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
    cart_lines,
    ensure_profile,
    publish_snapshots,
    resolve,
)

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
    activity = min(event.occurred_at, now or datetime.now(UTC))
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
        )
    )
    if status == "open":
        await arm(tx, event.cart_id, last + profiles.abandonment_delay)
    elif await cancel_timer(tx.conn, CART_ABANDONMENT, event.cart_id):
        out.cart_skips.append(status)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


async def abandonment_due(profiles: Profiles, tx: Tx, cart_id: str) -> tuple[Abandonment, str]:
    """A cart's timer fired (in its transaction): announce it or say why not.

    Returns the verdict and the cart's channel.
    """
    repo = profiles.repo(tx)
    cart = await repo.cart(cart_id, for_update=True)
    if cart is None:
        return Abandonment(False, None), ""
    owner = await resolve(repo, cart.customer_id) if cart.customer_id else None
    # Erasure deletes a shopper's carts; this only catches a cart that outlived its owner.
    erased = (
        owner is None and cart.customer_id is not None and await repo.is_erased(cart.customer_id)
    )
    bought = False
    if owner is not None:
        skus = await repo.skus_bought_since(owner, cart.last_activity_at)
        bought = covered_by((ln.sku for ln in cart.items), skus)
    verdict = judge_abandonment(
        status=cart.status,
        owner=owner,
        erased=erased,
        hash_now=cart.contents_hash,
        announced_hash=cart.announced_hash,
        bought_after_activity=bought,
    )
    if not verdict.announce:
        if bought and cart.status == "open":
            await repo.set_cart_status(cart_id, "purchased")
        return verdict, cart.channel
    assert owner is not None and cart.currency is not None
    await tx.emit(
        CartAbandoned(
            cart_id=cart_id,
            customer_id=owner,
            channel=cart.channel,
            items=[
                Line(
                    sku=ln.sku,
                    qty=ln.qty,
                    unit_price=Money(amount=ln.unit_price, currency=ln.currency),
                )
                for ln in cart.items
            ],
            value=Money(amount=Decimal(cart.value), currency=cart.currency),
            last_activity_at=cart.last_activity_at,
        ),
        correlation_id=cart_id,
    )
    await repo.set_cart_status(cart_id, "abandoned", announced_hash=cart.contents_hash)
    return verdict, cart.channel


def due_at(payload: dict[str, Any]) -> datetime | None:
    """The deadline a timer payload carries (for the lag metric), if any."""
    raw = payload.get("due_at")
    return datetime.fromisoformat(raw) if raw else None
