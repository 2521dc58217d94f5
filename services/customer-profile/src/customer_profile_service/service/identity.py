"""Who is who: starting profiles, identifiers, merges on proof, unmerges, snapshots.

Every function runs in the caller's transaction (``Tx``) and reports into an
:class:`Outcome`; a changed profile gets a fresh full snapshot (:func:`publish_snapshots`).
A profile's contact and preferences are derived from its facts (``domain/facts.py``), so
whatever order signals arrive in, and whatever merges and unmerges happened, each profile
shows what its own shoppers said.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from datetime import datetime

from omni_common.service import Tx
from omni_contracts import (
    CUSTOMER_PROFILE,
    Preferences,
    ProfilesMerged,
    ProfilesUnmerged,
    ProfileUpdated,
)
from omni_contracts.envelope import Envelope

from customer_profile_service.adapters.repository import ProfileRepository, ProfileRow
from customer_profile_service.adapters.sets import ProfileSets
from customer_profile_service.domain import (
    Claim,
    IdKind,
    ProfileError,
    decide_claim,
    normalise,
    survivor,
)
from customer_profile_service.domain import facts as F
from customer_profile_service.domain.snapshots import bound_snapshot
from customer_profile_service.service.context import Outcome, Profiles

log = logging.getLogger(__name__)

# Facts seeded from a profile stored before facts existed rank below any real answer.
_LEGACY = ["0000-00-00T00:00:00.000000Z", ""]


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
    """The live profile of ``customer_id``, created if new; None if the shopper was erased.

    Any signal naming a customer starts their profile: no channel can promise which of a
    shopper's signals arrives first. A profile seen earlier by a late signal starts then.
    """
    if await repo.is_erased(customer_id):
        return None
    p = await repo.profile(customer_id)
    starts = p is None or (p.merged_into is None and p.created_at > at)
    if starts and await repo.create_profile(customer_id, at):
        out.changed.add(customer_id)
    return await resolve(repo, customer_id) or customer_id


async def start_profile(
    repo: ProfileRepository, customer_id: str, at: datetime, out: Outcome
) -> str:
    """:func:`ensure_profile`, refusing an erased shopper (``erased_customer``)."""
    live = await ensure_profile(repo, customer_id, at, out)
    if live is None:
        raise ProfileError("erased_customer", f"customer {customer_id} asked to be forgotten")
    return live


async def load(repo: ProfileRepository, customer_id: str) -> ProfileRow:
    """A live profile, locked, with its facts (seeded from its columns if stored before)."""
    p = await repo.profile(customer_id, for_update=True)
    assert p is not None
    if not p.facts.get("origins"):
        p.facts = F.empty()
        ids = await repo.identifiers(customer_id)
        F.apply_contact(
            p.facts,
            customer_id,
            F.ContactChange(
                email=p.email,
                email_verified=p.email in ids[IdKind.EMAIL],
                phone=p.phone,
                phone_verified=p.phone in ids[IdKind.PHONE],
            ),
            _LEGACY,
        )
        for sub in p.push_subscriptions:
            F.apply_contact(p.facts, customer_id, F.ContactChange(push_subscription=sub), _LEGACY)
        for token in p.push_tokens:
            F.apply_contact(p.facts, customer_id, F.ContactChange(push_token=token), _LEGACY)
        F.apply_preferences(p.facts, customer_id, p.preferences, _LEGACY)
        F.apply_name(p.facts, customer_id, p.first_name, p.last_name, _LEGACY)
    return p


async def rederive(
    profiles: Profiles, repo: ProfileRepository, p: ProfileRow, out: Outcome
) -> None:
    """Derive ``p``'s contact and preferences from its facts and save them."""
    dropped = F.prune(p.facts, profiles.max_devices)
    d = F.derive(p.facts, p.customer_id, profiles.max_devices)
    p.email, p.phone = d.email, d.phone
    p.first_name, p.last_name = d.first_name, d.last_name
    p.push_tokens, p.push_subscriptions = d.push_tokens, d.push_subscriptions
    p.preferences = d.preferences
    await repo.save_contact(p)
    out.changed.add(p.customer_id)
    if dropped:
        out.devices_dropped += len(dropped)
        # Counts only: endpoints and tokens address a shopper's devices.
        log.info(
            "profile %s keeps its %d newest push devices: %d older dropped",
            p.customer_id,
            profiles.max_devices,
            len(dropped),
        )


async def sync_contacts(
    profiles: Profiles,
    tx: Tx,
    live: str,
    origin: str,
    p: ProfileRow,
    out: Outcome,
    envelope: Envelope | None,
) -> str:
    """Make the identifiers of ``origin`` its verified e-mail and phone; returns the live
    profile afterwards (a verified address held by another profile merges the two)."""
    repo = profiles.repo(tx)
    verified = F.verified_contacts(p.facts, origin)
    for kind in (IdKind.EMAIL, IdKind.PHONE):
        keep = [verified[kind.value]] if kind.value in verified else []
        await repo.release_others(kind, live, origin, keep)
    for name, value in sorted(verified.items()):
        live, _ = await claim(profiles, tx, live, IdKind(name), value, out, envelope, origin)
    return live


async def claim(
    profiles: Profiles,
    tx: Tx,
    customer_id: str,
    kind: IdKind,
    raw_value: str,
    out: Outcome,
    envelope: Envelope | None,
    origin: str | None = None,
) -> tuple[str, Claim]:
    """Present an identifier for ``customer_id``: add it, merge with its holder, or skip it.

    Only proof presents identifiers that merge (a login's device, a card at a till, a
    verified address); ``origin`` is the customer id whose signal presented it. Returns the
    live profile afterwards (the survivor after a merge) and the decision.
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
        if not await repo.add_identifier(kind, value, customer_id, origin):
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
        live = await merge(profiles, tx, customer_id, owner, out, envelope, kind.value)
        return live, decision
    return customer_id, decision


async def merge(
    profiles: Profiles,
    tx: Tx,
    a: str,
    b: str,
    out: Outcome,
    envelope: Envelope | None,
    proof: str,
) -> str:
    """Merge two profiles of one shopper into the older; returns the survivor.

    Their facts go side by side (consents: the most restrictive answer of either stands);
    identifiers, purchases and carts move over, remembering whose they were.
    ``customer.profiles.merged`` is published, the merged key tombstoned, the survivor's
    snapshot follows, and the identity log says what joined, when, on which ``proof``.
    """
    repo = profiles.repo(tx)
    # A fixed lock order: two merges of the same pair never deadlock.
    first, second = sorted([a, b])
    p1, p2 = await load(repo, first), await load(repo, second)
    s_id, m_id = survivor((p1.customer_id, p1.created_at), (p2.customer_id, p2.created_at))
    kept, gone = (p1, p2) if s_id == p1.customer_id else (p2, p1)
    for attr in ("loyalty_card", "preferred_store"):
        if getattr(kept, attr) is None:
            setattr(kept, attr, getattr(gone, attr))
    kept.facts = F.merge(kept.facts, gone.facts, m_id, profiles.clock())
    await rederive(profiles, repo, kept, out)
    await repo.mark_merged(m_id, s_id)
    await repo.log_identity(s_id, m_id, "merged", proof, None)
    await tx.emit(ProfilesMerged(surviving_id=s_id, merged_ids=[m_id]), caused_by=envelope)
    await tx.emit_tombstone(CUSTOMER_PROFILE, m_id)
    log.info("profile %s merged into %s on %s", m_id, s_id, proof)
    out.merges += 1
    out.changed.discard(m_id)
    out.changed.add(s_id)
    return s_id


async def unmerge(
    profiles: Profiles,
    tx: Tx,
    surviving_id: str,
    merged_id: str,
    reason: str,
    envelope: Envelope | None = None,
) -> Outcome:
    """Undo a merge: ``merged_id`` lives again with what was its own.

    Its facts (contact, consents, devices) leave the survivor's; identifiers, purchases and
    carts that were its own move back. ``customer.profiles.unmerged`` and fresh snapshots
    of both follow. Refused (``not_merged``) unless ``merged_id`` is merged into
    ``surviving_id``.
    """
    repo = profiles.repo(tx)
    out = Outcome()
    first, second = sorted([surviving_id, merged_id])
    rows = {first: await repo.profile(first, for_update=True)}
    rows[second] = await repo.profile(second, for_update=True)
    s, m = rows[surviving_id], rows[merged_id]
    if s is None or m is None or s.merged_into is not None or m.merged_into != surviving_id:
        raise ProfileError("not_merged", f"{merged_id} is not merged into {surviving_id}")
    s = await load(repo, surviving_id)
    m = await repo.profile(merged_id, for_update=True)
    assert m is not None
    leaving = sorted(F.origins_via(s.facts, merged_id))
    s.facts, m.facts = F.split(s.facts, merged_id)
    await repo.restore(surviving_id, merged_id, leaving)
    for p in (s, m):
        cards = (await repo.identifiers(p.customer_id))[IdKind.LOYALTY_CARD]
        if p.loyalty_card not in cards:
            p.loyalty_card = cards[0] if cards else None
        p.preferred_store = await repo.preferred_store(p.customer_id)
        await rederive(profiles, repo, p, out)
    await repo.log_identity(surviving_id, merged_id, "unmerged", "request", reason)
    await tx.emit(
        ProfilesUnmerged(surviving_id=surviving_id, restored_id=merged_id, reason=reason),
        caused_by=envelope,
    )
    log.info("profile %s restored from %s", merged_id, surviving_id)
    out.unmerges += 1
    out.changed |= {surviving_id, merged_id}
    await publish_snapshots(profiles, tx, out, envelope)
    return out


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
    causes = dict.fromkeys(live, envelope) if envelope is not None else {}
    await publish_live_snapshots(tx, live, out, causes)


async def publish_live_snapshots(
    tx: Tx, customer_ids: Collection[str], out: Outcome, causes: Mapping[str, Envelope]
) -> None:
    """A full ``customer.profile.updated`` of each of these live profiles, their versions
    bumped together; each caused by its shopper's entry in ``causes``."""
    if not customer_ids:
        return
    sets = ProfileSets(tx.conn)
    rows = await sets.bump_versions(customer_ids)
    ids = await sets.identifiers(rows)
    for customer_id in sorted(rows):
        p = rows[customer_id]
        await tx.emit(
            snapshot_of(p, ids[customer_id], p.version), caused_by=causes.get(customer_id)
        )
        out.snapshots += 1


def snapshot_of(p: ProfileRow, ids: dict[IdKind, list[str]], version: int) -> ProfileUpdated:
    """``p`` with its identifiers as published at ``version``, bounded to the topic's size."""

    def with_primary(values: list[str], primary: str | None) -> list[str]:
        return values if primary is None or primary in values else [primary, *values]

    fields = bound_snapshot(
        {
            "customer_id": p.customer_id,
            "email": p.email,
            "phone": p.phone,
            "push_tokens": p.push_tokens,
            "push_subscriptions": p.push_subscriptions,
            "first_name": p.first_name,
            "last_name": p.last_name,
            "anonymous_ids": ids[IdKind.ANONYMOUS_ID],
            "loyalty_card": p.loyalty_card,
            "emails": with_primary(ids[IdKind.EMAIL], p.email),
            "phones": with_primary(ids[IdKind.PHONE], p.phone),
            "loyalty_cards": with_primary(ids[IdKind.LOYALTY_CARD], p.loyalty_card),
            "tier": p.tier,
            "preferences": Preferences.model_validate(p.preferences).model_dump(mode="json"),
            "preferred_store": p.preferred_store,
        }
    )
    return ProfileUpdated(version=version, **fields)
