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
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from omni_common.service import Tx
from omni_common.timers import cancel_timer, set_timer
from omni_contracts import (
    CUSTOMER_PROFILE,
    ContactDetailsUpdated,
    ContactField,
    CustomerIdentified,
    ErasureRequested,
    Line,
    Preferences,
    PreferencesUpdated,
    ProfileErased,
    ProfilesMerged,
    ProfileUpdated,
    SaleRecorded,
)
from omni_contracts.envelope import Envelope

from customer_profile_service.adapters.repository import ProfileRepository, ProfileRow
from customer_profile_service.domain import (
    CartLine,
    Claim,
    IdKind,
    ProfileError,
    covered_by,
    decide_claim,
    is_blocked,
    normalise,
    survivor,
    validate_contact,
)
from customer_profile_service.service.context import CART_ABANDONMENT, Outcome, Profiles

log = logging.getLogger(__name__)


def cart_lines(lines: list[Line]) -> list[CartLine]:
    """Contract lines as domain lines."""
    return [CartLine(ln.sku, ln.qty, ln.unit_price.amount, ln.unit_price.currency) for ln in lines]


# -- resolving who is who ------------------------------------------------------------------------


async def resolve(repo: ProfileRepository, customer_id: str) -> str | None:
    """The live profile ``customer_id`` is (itself, or the survivor it was merged into)."""
    current = customer_id
    for _ in range(16):  # merges flatten chains; the bound only guards against a cycle
        profile = await repo.profile(current)
        if profile is None:
            return None
        if profile.merged_into is None:
            return current
        current = profile.merged_into
    raise RuntimeError(f"merge chain of {customer_id} does not end")


async def ensure_profile(
    repo: ProfileRepository, customer_id: str, at: datetime, out: Outcome
) -> str | None:
    """The live profile of ``customer_id``, created if new; None if the shopper was erased."""
    if await repo.is_erased(customer_id):
        return None
    live = await resolve(repo, customer_id)
    if live is not None:
        return live
    if await repo.create_profile(customer_id, at):
        out.changed.add(customer_id)
    return customer_id


async def require_profile(repo: ProfileRepository, customer_id: str) -> str:
    """The live profile of a known shopper, or :class:`ProfileError` saying why not."""
    if await repo.is_erased(customer_id):
        raise ProfileError("erased_customer", f"customer {customer_id} asked to be forgotten")
    live = await resolve(repo, customer_id)
    if live is None:
        raise ProfileError(
            "unknown_customer",
            f"no profile {customer_id}: a profile starts with customer.identified,"
            " a checkout, an order or a store sale",
        )
    return live


async def claim(
    profiles: Profiles,
    tx: Tx,
    customer_id: str,
    kind: IdKind,
    raw_value: str,
    out: Outcome,
    envelope: Envelope | None,
) -> tuple[str, Claim]:
    """Present an identifier for ``customer_id``: add it, merge with its holder, or skip it.

    Returns the live profile afterwards (the survivor after a merge) and the decision.
    """
    repo = profiles.repo(tx)
    value = normalise(kind, raw_value)
    owner = await repo.owner(kind, value)
    counts = await repo.identifier_counts(customer_id)
    other = await repo.identifier_counts(owner) if owner and owner != customer_id else None
    decision = decide_claim(
        kind, value, customer_id, owner, counts, other, profiles.limits, profiles.blocked
    )
    if decision.action == "add":
        if not await repo.add_identifier(kind, value, customer_id):
            # Taken by a concurrent handler meanwhile: retried, it then sees the owner.
            raise RuntimeError(f"{kind} identifier claimed concurrently; retrying")
        out.changed.add(customer_id)
    elif decision.action == "skip":
        assert decision.skip is not None
        await repo.record_skip(kind, value, customer_id, decision.other, decision.skip.value)
        out.skipped_identifiers.append((kind.value, decision.skip.value))
        # Never the value itself: identifiers are personal data.
        log.info(
            "%s of %s not applied: %s (held by %s)",
            kind,
            customer_id,
            decision.skip,
            decision.other or "nobody",
        )
    elif decision.action == "merge":
        assert owner is not None
        return await merge(profiles, tx, customer_id, owner, out, envelope), decision
    return customer_id, decision


async def merge(
    profiles: Profiles, tx: Tx, a: str, b: str, out: Outcome, envelope: Envelope | None
) -> str:
    """Merge two profiles of one shopper into the older; returns the survivor.

    The survivor keeps its own contact details and takes the merged one's where it has none;
    identifiers, purchases and carts move over. ``customer.profiles.merged`` is published,
    the merged key is tombstoned, and the survivor's snapshot follows.
    """
    repo = profiles.repo(tx)
    # A fixed lock order: two merges of the same pair never deadlock.
    first, second = sorted([a, b])
    p1 = await repo.profile(first, for_update=True)
    p2 = await repo.profile(second, for_update=True)
    assert p1 is not None and p2 is not None
    s_id, m_id = survivor((p1.customer_id, p1.created_at), (p2.customer_id, p2.created_at))
    kept, gone = (p1, p2) if s_id == p1.customer_id else (p2, p1)
    for attr in ("email", "phone", "loyalty_card", "first_name", "last_name", "preferred_store"):
        if getattr(kept, attr) is None:
            setattr(kept, attr, getattr(gone, attr))
    kept.push_tokens = list(dict.fromkeys([*kept.push_tokens, *gone.push_tokens]))
    endpoints = {s["endpoint"] for s in kept.push_subscriptions}
    kept.push_subscriptions += [
        s for s in gone.push_subscriptions if s["endpoint"] not in endpoints
    ]
    if not kept.preferences:
        kept.preferences = gone.preferences
    await repo.save_contact(kept)
    await repo.mark_merged(m_id, s_id)
    await tx.emit(ProfilesMerged(surviving_id=s_id, merged_ids=[m_id]), caused_by=envelope)
    await tx.emit_tombstone(CUSTOMER_PROFILE, m_id)
    log.info("profile %s merged into %s", m_id, s_id)
    out.merges += 1
    out.changed.discard(m_id)
    out.changed.add(s_id)
    return s_id


async def publish_snapshots(
    profiles: Profiles, tx: Tx, out: Outcome, envelope: Envelope | None
) -> None:
    """Write a full ``customer.profile.updated`` of every changed live profile."""
    repo = profiles.repo(tx)
    live: set[str] = set()
    for customer_id in out.changed:
        resolved = await resolve(repo, customer_id)
        if resolved is not None:
            live.add(resolved)
    for customer_id in sorted(live):
        await tx.emit(await snapshot(repo, customer_id), caused_by=envelope)
        out.snapshots += 1


async def snapshot(repo: ProfileRepository, customer_id: str) -> ProfileUpdated:
    """The full profile as published (its version bumped)."""
    p = await repo.profile(customer_id)
    assert p is not None
    ids = await repo.identifiers(customer_id)
    return snapshot_of(p, ids, await repo.next_version(customer_id))


def snapshot_of(p: ProfileRow, ids: dict[IdKind, list[str]], version: int) -> ProfileUpdated:
    """A profile and its identifiers as published, at ``version``."""

    def with_primary(values: list[str], primary: str | None) -> list[str]:
        return values if primary is None or primary in values else [primary, *values]

    return ProfileUpdated(
        customer_id=p.customer_id,
        version=version,
        email=p.email,
        phone=p.phone,
        push_tokens=p.push_tokens,
        push_subscriptions=p.push_subscriptions,
        first_name=p.first_name,
        last_name=p.last_name,
        anonymous_ids=ids[IdKind.ANONYMOUS_ID],
        loyalty_card=p.loyalty_card,
        emails=with_primary(ids[IdKind.EMAIL], p.email),
        phones=with_primary(ids[IdKind.PHONE], p.phone),
        loyalty_cards=with_primary(ids[IdKind.LOYALTY_CARD], p.loyalty_card),
        tier=p.tier,
        preferences=Preferences.model_validate(p.preferences),
        preferred_store=p.preferred_store,
    )


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
        profiles, tx, customer_id, IdKind.ANONYMOUS_ID, event.anonymous_id, out, envelope
    )
    if decision.skip is None or decision.skip.value != "blocked_value":
        for cart_id in await repo.adopt_anonymous_carts(event.anonymous_id, customer_id):
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

    The new e-mail or phone becomes an identifier (which may merge profiles); the one it
    replaces no longer identifies the shopper. Refused: unknown or erased customers,
    malformed or placeholder contacts.
    """
    repo = profiles.repo(tx)
    out = Outcome()
    customer_id = await require_profile(repo, event.customer_id)
    p = await repo.profile(customer_id, for_update=True)
    assert p is not None
    new: dict[IdKind, str] = {}
    for kind, raw in ((IdKind.EMAIL, event.email), (IdKind.PHONE, event.phone)):
        if raw is None:
            continue
        value = validate_contact(kind, raw)
        if is_blocked(value, profiles.blocked):
            raise ProfileError("blocked_identifier", f"{kind} is a placeholder value")
        new[kind] = value
    cleared = set(event.cleared)
    for kind, attr, field in (
        (IdKind.EMAIL, "email", ContactField.EMAIL),
        (IdKind.PHONE, "phone", ContactField.PHONE),
    ):
        old = getattr(p, attr)
        replacing = kind in new and new[kind] != old
        if old is not None and (replacing or field in cleared):
            await repo.release_identifier(kind, old, customer_id)
            setattr(p, attr, None)
        if replacing:
            setattr(p, attr, new[kind])
    if event.push_token is not None and event.push_token not in p.push_tokens:
        p.push_tokens.append(event.push_token)
    if ContactField.PUSH_TOKEN in cleared:
        p.push_tokens = []
    if event.push_subscription is not None:
        sub = event.push_subscription.model_dump(mode="json", exclude_none=True)
        p.push_subscriptions = [
            s for s in p.push_subscriptions if s["endpoint"] != sub["endpoint"]
        ] + [sub]
    if ContactField.PUSH_SUBSCRIPTION in cleared:
        p.push_subscriptions = []
    await repo.save_contact(p)
    out.changed.add(customer_id)
    for kind, value in new.items():
        customer_id, _ = await claim(profiles, tx, customer_id, kind, value, out, envelope)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


def _merge_preferences(old: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    merged = dict(old)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


async def preferences_updated(
    profiles: Profiles, tx: Tx, event: PreferencesUpdated, envelope: Envelope | None = None
) -> Outcome:
    """Consent, channel, language, time zone or quiet hours changed (only the non-null
    values sent; consent is withdrawn with ``false``)."""
    repo = profiles.repo(tx)
    out = Outcome()
    customer_id = await require_profile(repo, event.customer_id)
    # Null means "unchanged": producers write every field, nulls included (see the contact
    # update's ``cleared``), so a partial update must not wipe what it does not mention.
    given = event.preferences.model_dump(mode="json", exclude_none=True)
    if zone := given.get("time_zone"):
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ProfileError("invalid_preferences", f"unknown time zone {zone!r}") from exc
    p = await repo.profile(customer_id, for_update=True)
    assert p is not None
    merged = _merge_preferences(p.preferences, given)
    if (merged.get("quiet_hours_start") is None) != (merged.get("quiet_hours_end") is None):
        raise ProfileError(
            "invalid_preferences", "quiet hours need both quiet_hours_start and quiet_hours_end"
        )
    p.preferences = merged
    await repo.save_contact(p)
    out.changed.add(customer_id)
    await publish_snapshots(profiles, tx, out, envelope)
    return out


# -- purchases ---------------------------------------------------------------------------------


async def _after_purchase(
    profiles: Profiles, tx: Tx, customer_id: str, at: datetime, out: Outcome
) -> None:
    """Carts whose items were bought since their last activity need no reminder; the
    preferred store may have changed."""
    repo = profiles.repo(tx)
    for cart in await repo.live_carts_before(customer_id, at):
        bought = await repo.skus_bought_since(customer_id, cart.last_activity_at)
        if covered_by((ln.sku for ln in cart.items), bought):
            await repo.set_cart_status(cart.cart_id, "purchased")
            if await cancel_timer(tx.conn, CART_ABANDONMENT, cart.cart_id):
                out.cart_skips.append("purchased")
    store = await repo.preferred_store(customer_id)
    p = await repo.profile(customer_id, for_update=True)
    if p is not None and store is not None and store != p.preferred_store:
        p.preferred_store = store
        await repo.save_contact(p)
        out.changed.add(customer_id)


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
                profiles, tx, customer_id, IdKind.LOYALTY_CARD, sale.loyalty_card, out, envelope
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
    )
    await _after_purchase(profiles, tx, customer_id, sale.occurred_at, out)
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
