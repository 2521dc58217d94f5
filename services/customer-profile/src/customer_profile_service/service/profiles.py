"""Identity, contact, preferences, purchase history and erasure: the profile's use cases.

Every function takes the policy (:class:`Profiles`), the transaction (``Tx``: a connection
plus the outbox) and the event; none commits or publishes by itself. Each returns an
:class:`Outcome`; every profile it changed gets a fresh full snapshot in the same
transaction (:func:`publish_snapshots`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from omni_common.service import Tx
from omni_common.timers import cancel_timer, set_timer
from omni_contracts import (
    CUSTOMER_PROFILE,
    ContactDetailsUpdated,
    CustomerIdentified,
    ErasureRequested,
    PreferencesUpdated,
    ProfileErased,
    PushAddressesGone,
    SaleRecorded,
    UnmergeRequested,
)
from omni_contracts.envelope import Envelope

from customer_profile_service.domain import (
    IdKind,
    ProfileError,
    is_blocked,
    normalise,
    validate_contact,
)
from customer_profile_service.domain import facts as F
from customer_profile_service.service.context import CART_ABANDONMENT, Outcome, Profiles
from customer_profile_service.service.identity import (
    claim,
    ensure_profile,
    load,
    publish_snapshots,
    rederive,
    resolve,
    start_profile,
    sync_contacts,
    unmerge,
)
from customer_profile_service.service.purchases import after_purchases, cart_lines

__all__ = ["ensure_profile", "publish_snapshots", "resolve"]

log = logging.getLogger(__name__)


# -- signals -----------------------------------------------------------------------------------


async def identified(
    profiles: Profiles, tx: Tx, event: CustomerIdentified, envelope: Envelope | None = None
) -> Outcome:
    """A login or sign-up joins a device to a customer; the device's carts become theirs.

    A device already joined to another known customer is recorded, never merged.
    """
    repo = profiles.repo(tx)
    out = Outcome()
    if await repo.is_erased(event.customer_id):
        raise ProfileError("erased_customer", f"customer {event.customer_id} was erased")
    # The device's carts may be arriving right now on cart.events.v1.
    await repo.lock(profiles.lock_namespace, f"device:{event.anonymous_id}")
    customer_id = await ensure_profile(repo, event.customer_id, event.occurred_at, out)
    assert customer_id is not None
    customer_id, decision = await claim(
        profiles,
        tx,
        customer_id,
        IdKind.ANONYMOUS_ID,
        event.anonymous_id,
        out,
        envelope,
        event.customer_id,
    )
    if decision.skip is None or decision.skip.value != "blocked_value":
        adopted = await repo.adopt_anonymous_carts(
            event.anonymous_id, customer_id, event.customer_id
        )
        for cart_id in adopted:
            await _rearm_if_fired(profiles, tx, cart_id)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


async def _rearm_if_fired(profiles: Profiles, tx: Tx, cart_id: str) -> None:
    # A cart whose timer fired while nobody owned it waits for its owner: logging in is
    # activity, so its reminder is due one delay from now. A pending timer runs on.
    repo = profiles.repo(tx)
    cart = await repo.cart(cart_id, for_update=True)
    if cart is None or cart.status != "open":
        return
    if not await repo.lock_timer(CART_ABANDONMENT, cart_id):
        await arm(tx, cart_id, profiles.clock() + profiles.abandonment_delay)


async def arm(tx: Tx, cart_id: str, due: datetime) -> None:
    """Arm (or move) a cart's abandonment timer; the deadline rides along for the lag metric."""
    await set_timer(tx.conn, CART_ABANDONMENT, cart_id, due, {"due_at": due.isoformat()})


async def contact_updated(
    profiles: Profiles, tx: Tx, event: ContactDetailsUpdated, envelope: Envelope | None = None
) -> Outcome:
    """A shopper changed or removed an e-mail, phone or push registration.

    Starts the profile if this is the first word about the shopper. The contact is kept
    whatever its proof; only a verified e-mail or phone becomes an identifier (which may
    merge profiles), and the one it replaces no longer identifies the shopper. Refused:
    erased customers, malformed or placeholder contacts.
    """
    repo = profiles.repo(tx)
    out = Outcome()
    new: dict[IdKind, str] = {}
    for kind, raw in ((IdKind.EMAIL, event.email), (IdKind.PHONE, event.phone)):
        if raw is None:
            continue
        value = validate_contact(kind, raw)
        if is_blocked(value, profiles.blocked):
            raise ProfileError("blocked_identifier", f"{kind} is a placeholder value")
        new[kind] = value
    live = await start_profile(repo, event.customer_id, event.occurred_at, out)
    p = await load(repo, live)
    change = F.ContactChange(
        email=new.get(IdKind.EMAIL),
        email_verified=bool(event.email_verified),
        phone=new.get(IdKind.PHONE),
        phone_verified=bool(event.phone_verified),
        push_token=event.push_token,
        push_subscription=(
            event.push_subscription.model_dump(mode="json", exclude_none=True)
            if event.push_subscription
            else None
        ),
        cleared=frozenset(f.value for f in event.cleared),
    )
    F.apply_contact(p.facts, event.customer_id, change, _stamp(event.occurred_at, envelope))
    await rederive(profiles, repo, p, out)
    await sync_contacts(profiles, tx, live, event.customer_id, p, out, envelope)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


async def push_addresses_gone(
    profiles: Profiles, tx: Tx, event: PushAddressesGone, envelope: Envelope | None = None
) -> Outcome:
    """A push service said devices are gone: the profile forgets them for good (a push
    service never hands a gone endpoint or token out again, so a later registration of one
    is a stale re-send). Unknown and erased shoppers: nothing to forget."""
    repo = profiles.repo(tx)
    out = Outcome()
    if await repo.is_erased(event.customer_id):
        return out
    live = await resolve(repo, event.customer_id)
    if live is None:
        return out
    p = await load(repo, live)
    gone = F.ContactChange(
        gone_endpoints=tuple(event.endpoints), gone_tokens=tuple(event.push_tokens)
    )
    # Gone wherever it was registered: the device is the push service's, not an origin's.
    for origin in list(F.origins(p.facts)):
        F.apply_contact(p.facts, origin, gone, _stamp(event.occurred_at, envelope))
    before = len(p.push_subscriptions) + len(p.push_tokens)
    await rederive(profiles, repo, p, out)
    out.devices_dropped += max(before - len(p.push_subscriptions) - len(p.push_tokens), 0)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


def _stamp(at: datetime, envelope: Envelope | None) -> F.Stamp:
    # The event id breaks ties between answers given in the same microsecond, alike everywhere.
    return F.stamp(at, envelope.id if envelope else "")


async def preferences_updated(
    profiles: Profiles, tx: Tx, event: PreferencesUpdated, envelope: Envelope | None = None
) -> Outcome:
    """Consent, channel, language, time zone or quiet hours changed (only the non-null
    values sent; consent is withdrawn with ``false``). Starts the profile if new."""
    repo = profiles.repo(tx)
    out = Outcome()
    # Null means "unchanged": producers write every field, nulls included (see the contact
    # update's ``cleared``), so a partial update must not wipe what it does not mention.
    given = event.preferences.model_dump(mode="json", exclude_none=True)
    if zone := given.get("time_zone"):
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ProfileError("invalid_preferences", f"unknown time zone {zone!r}") from exc
    live = await start_profile(repo, event.customer_id, event.occurred_at, out)
    p = await load(repo, live)
    F.apply_preferences(p.facts, event.customer_id, given, _stamp(event.occurred_at, envelope))
    derived = F.derive(p.facts, live, profiles.max_devices).preferences
    if (derived.get("quiet_hours_start") is None) != (derived.get("quiet_hours_end") is None):
        raise ProfileError(
            "invalid_preferences", "quiet hours need both quiet_hours_start and quiet_hours_end"
        )
    await rederive(profiles, repo, p, out)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


async def unmerge_requested(
    profiles: Profiles, tx: Tx, event: UnmergeRequested, envelope: Envelope | None = None
) -> Outcome:
    """Ops or the call centre undo a wrong merge (see :func:`identity.unmerge`)."""
    return await unmerge(profiles, tx, event.surviving_id, event.merged_id, event.reason, envelope)


# -- purchases ---------------------------------------------------------------------------------


def names_a_shopper(sale: SaleRecorded) -> bool:
    """Whether a till sale can join anyone's history: an anonymous one (no customer id, no
    loyalty card) has nothing to change here."""
    return bool(sale.customer_id or sale.loyalty_card)


async def sale_recorded(
    profiles: Profiles, tx: Tx, sale: SaleRecorded, envelope: Envelope | None = None
) -> Outcome:
    """A till sale joins the history of the shopper it names (customer id or loyalty card).

    A card presented with a customer id becomes theirs (merging a profile that held it).
    """
    repo = profiles.repo(tx)
    out = Outcome()
    customer_id: str | None = None
    if sale.customer_id:
        customer_id = await ensure_profile(repo, sale.customer_id, sale.occurred_at, out)
    if sale.loyalty_card:
        if customer_id is not None:
            customer_id, decision = await claim(
                profiles,
                tx,
                customer_id,
                IdKind.LOYALTY_CARD,
                sale.loyalty_card,
                out,
                envelope,
                sale.customer_id,
            )
            p = await repo.profile(customer_id, for_update=True)
            if p is not None and p.loyalty_card is None and decision.action != "skip":
                p.loyalty_card = normalise(IdKind.LOYALTY_CARD, sale.loyalty_card)
                await repo.save_contact(p)
                out.changed.add(customer_id)
        elif not is_blocked(sale.loyalty_card, profiles.blocked):
            owner = await repo.owner(
                IdKind.LOYALTY_CARD, normalise(IdKind.LOYALTY_CARD, sale.loyalty_card)
            )
            customer_id = await resolve(repo, owner) if owner else None
    if customer_id is None:
        return out  # an anonymous sale (or an erased shopper's card)
    lines = cart_lines(sale.lines)
    total = sale.total.amount if sale.total else sum(ln.total().amount for ln in sale.lines)
    await repo.upsert_purchase(
        purchase_key=f"sale:{sale.sale_id}",
        order_id=None,
        customer_id=customer_id,
        channel="store",
        status="completed",
        lines=lines,
        total=Decimal(total),
        currency=sale.lines[0].unit_price.currency,
        location_id=sale.location_id,
        placed_at=sale.occurred_at,
        origin_id=sale.customer_id,
    )
    await after_purchases(profiles, tx, {customer_id: sale.occurred_at}, out)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


# -- erasure -----------------------------------------------------------------------------------


async def erasure_requested(
    profiles: Profiles, tx: Tx, event: ErasureRequested, envelope: Envelope | None = None
) -> Outcome:
    """Forget a shopper: every profile merged into theirs, identifiers, history and carts.

    Publishes ``customer.profile.erased`` and a tombstone per id, so the compacted topic
    forgets them and every service erases what it holds. An unknown id is erased all the
    same (other services may know it).
    """
    repo = profiles.repo(tx)
    out = Outcome(erased=1)
    root = await resolve(repo, event.customer_id) or event.customer_id
    ids = sorted({event.customer_id, *await repo.group_of(root)})
    anonymous_ids: list[str] = []
    for customer_id in ids:
        anonymous_ids += (await repo.identifiers(customer_id))[IdKind.ANONYMOUS_ID]
    device_carts = await repo.carts_of_devices(anonymous_ids)
    for cart_id in {*await repo.carts_of(ids), *device_carts}:
        await cancel_timer(tx.conn, CART_ABANDONMENT, cart_id)
    await repo.delete_carts(device_carts)
    await repo.erase(ids, event.request_id, CUSTOMER_PROFILE)
    for customer_id in ids:
        await tx.emit(ProfileErased(customer_id=customer_id), caused_by=envelope)
        await tx.emit_tombstone(CUSTOMER_PROFILE, customer_id)
    log.info("erased customer %s (%d profiles)", event.customer_id, len(ids))
    return out
