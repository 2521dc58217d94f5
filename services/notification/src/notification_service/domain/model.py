"""The notification domain, pure: which messages exist, who may get them, on which channel,
and when. No I/O: the use cases load the facts and apply these rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from omni_contracts import Line, NotificationChannel, Preferences


class Purpose(StrEnum):
    """Why a message is sent: consent, the contact budget and the digest depend on it."""

    # Order updates the shopper expects: sent unless they said no on that channel; they use
    # up the contact budget but never wait for it.
    TRANSACTIONAL = "transactional"
    # Reminders, offers, alerts: only where the shopper said yes; they wait for room in the
    # contact budget and for the end of quiet hours, and go together as one digest.
    MARKETING = "marketing"


class Status(StrEnum):
    """Where a notification stands."""

    PENDING = "pending"  # decided, waiting for the dispatcher
    SENDING = "sending"  # the intent is recorded; the provider is being called
    SENT = "sent"
    DEFERRED = "deferred"  # held until ``deferred_until`` (the budget, quiet hours)
    SUPPRESSED = "suppressed"
    FAILED = "failed"


class Reason(StrEnum):
    """Why a message was suppressed (the contract's reasons plus this service's own)."""

    NO_CONSENT = "no_consent"
    QUIET_HOURS = "quiet_hours"
    # Deferred: the shopper's contact budget over its window is spent.
    BUDGET = "budget"
    # Suppressed: deferred so long that it would no longer be news.
    THROTTLED = "throttled"
    DUPLICATE = "duplicate"
    NO_CONTACT = "no_contact"
    ALREADY_BOUGHT = "already_bought"
    OUT_OF_STOCK = "out_of_stock"
    ERASED = "erased"


@dataclass(frozen=True)
class Kind:
    """A kind of message: its template name and purpose."""

    name: str
    purpose: Purpose


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("cart_reminder", Purpose.MARKETING),
        Kind("stock_alert_offer", Purpose.MARKETING),
        Kind("back_in_stock", Purpose.MARKETING),
        Kind("loyalty_offer_issued", Purpose.MARKETING),
        Kind("order_confirmed", Purpose.TRANSACTIONAL),
        Kind("order_ready_for_pickup", Purpose.TRANSACTIONAL),
        Kind("order_delayed", Purpose.TRANSACTIONAL),
        Kind("order_cancelled", Purpose.TRANSACTIONAL),
        Kind("order_refund_issued", Purpose.TRANSACTIONAL),
        Kind("loyalty_tier_changed", Purpose.TRANSACTIONAL),
        Kind("loyalty_points_expiring", Purpose.TRANSACTIONAL),
    )
}
"""Every message kind this service sends."""

DEFAULT_CHANNEL_ORDER: tuple[NotificationChannel, ...] = (
    NotificationChannel.PUSH,
    NotificationChannel.EMAIL,
    NotificationChannel.SMS,
)


@dataclass(frozen=True)
class Contact:
    """How one shopper can be reached, from the last profile snapshot."""

    customer_id: str
    email: str | None = None
    phone: str | None = None
    push_tokens: tuple[str, ...] = ()
    push_subscriptions: tuple[Mapping[str, Any], ...] = ()
    preferences: Preferences = field(default_factory=Preferences)
    preferred_store: str | None = None

    def reachable_on(self, channel: NotificationChannel) -> bool:
        """Whether the shopper left an address for ``channel``."""
        if channel is NotificationChannel.EMAIL:
            return bool(self.email)
        if channel is NotificationChannel.SMS:
            return bool(self.phone)
        return bool(self.push_tokens or self.push_subscriptions)


def consents_to(prefs: Preferences, purpose: Purpose, channel: NotificationChannel) -> bool:
    """Consent per channel and purpose: marketing needs a yes, transactional only no no."""
    if purpose is Purpose.MARKETING:
        return prefs.consents.allows(channel)
    return not prefs.transactional_consents.refuses(channel)


@dataclass(frozen=True)
class Route:
    """The channels to try, in order, or why there are none."""

    channels: tuple[NotificationChannel, ...]
    refusal: Reason | None = None


def route(contact: Contact | None, purpose: Purpose) -> Route:
    """The preferred channel first, then push -> e-mail -> SMS, where reachable and consented.

    No address on any channel is ``no_contact``; addresses but no consent is ``no_consent``.
    """
    if contact is None:
        return Route((), Reason.NO_CONTACT)
    preferred = contact.preferences.preferred_channel
    order = ([preferred] if preferred else []) + [
        c for c in DEFAULT_CHANNEL_ORDER if c != preferred
    ]
    reachable = [c for c in order if contact.reachable_on(c)]
    if not reachable:
        return Route((), Reason.NO_CONTACT)
    allowed = tuple(c for c in reachable if consents_to(contact.preferences, purpose, c))
    if not allowed:
        return Route((), Reason.NO_CONSENT)
    return Route(allowed)


def zone_of(prefs: Preferences, default_zone: str) -> ZoneInfo:
    """The shopper's zone; the platform's default when unset or unknown."""
    for name in (prefs.time_zone, default_zone, "UTC"):
        if not name:
            continue
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    return ZoneInfo("UTC")


def quiet_until(now: datetime, prefs: Preferences, default_zone: str) -> datetime | None:
    """When the shopper's quiet hours end if ``now`` falls in them (UTC), else None.

    Quiet hours are local wall-clock times and may span midnight (22:00-07:00).
    """
    start, end = prefs.quiet_hours_start, prefs.quiet_hours_end
    if start is None or end is None or start == end:
        return None
    zone = zone_of(prefs, default_zone)
    local = now.astimezone(zone)
    t = local.time().replace(tzinfo=None)
    start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    day: date = local.date()
    if start < end:
        if not start <= t < end:
            return None
    else:  # spans midnight
        if end <= t < start:
            return None
        if t >= start:
            day = day + timedelta(days=1)
    return _local(day, end, zone).astimezone(UTC)


def _local(day: date, at: time, zone: ZoneInfo) -> datetime:
    # A wall-clock time skipped by a DST jump resolves to the instant after the jump.
    moment = datetime.combine(day, at, tzinfo=zone)
    roundtrip = moment.astimezone(UTC).astimezone(zone)
    return roundtrip if roundtrip.replace(tzinfo=None) != moment.replace(tzinfo=None) else moment


@dataclass(frozen=True)
class PurposePolicy:
    """How a purpose meets the contact budget: whether its messages use it up, wait for room
    in it (and for the end of quiet hours), and go together as one digest."""

    counted: bool
    deferred: bool
    digest: bool


@dataclass(frozen=True)
class Budget:
    """At most ``limit`` contacts (messages or digests, every channel) per rolling ``window``
    for a message of a purpose that waits for it."""

    limit: int
    window: timedelta


def next_slot(
    now: datetime,
    contacts: Iterable[datetime],
    budget: Budget,
    prefs: Preferences,
    default_zone: str,
) -> tuple[datetime, Reason | None]:
    """The earliest moment from ``now`` inside the budget and outside quiet hours, and why it
    is not ``now`` (``budget`` when the budget moved it at all, else ``quiet_hours``).

    ``contacts`` are when the shopper was contacted; one counts while it is less than a
    window old. Those to come are not known: the message is decided again at the slot.
    """
    sent = sorted(contacts)
    slot, why = now, None
    # Each round moves the slot later; the budget only frees up as time passes, so a few
    # rounds settle it (quiet hours, then the budget again, at most).
    for _ in range(8):
        counted = [c for c in sent if c > slot - budget.window]
        moved = False
        if len(counted) >= budget.limit:
            # When the oldest contacts that keep the count at the limit leave the window.
            slot = counted[len(counted) - budget.limit] + budget.window
            why, moved = why or Reason.BUDGET, True
        quiet = quiet_until(slot, prefs, default_zone)
        if quiet is not None and quiet > slot:
            slot, why, moved = quiet, why or Reason.QUIET_HOURS, True
        if not moved:
            break
    return slot, why


@dataclass(frozen=True)
class CartCheck:
    """What is left of an abandoned cart to remind the shopper of, and why items went."""

    remaining: tuple[Line, ...]
    out_of_stock: tuple[str, ...]
    bought: tuple[str, ...]

    @property
    def refusal(self) -> Reason | None:
        """Why no reminder goes out (None: remind of ``remaining``)."""
        if self.remaining:
            return None
        return Reason.OUT_OF_STOCK if self.out_of_stock else Reason.ALREADY_BOUGHT


def check_cart(
    items: Sequence[Line],
    *,
    closed: bool,
    bought_since: Iterable[str],
    online_available: Mapping[str, int],
) -> CartCheck:
    """Leave out what was bought meanwhile and what is out of stock online now.

    A cart closed by a checkout (or an order naming it) keeps nothing. A SKU whose
    availability was never seen counts as in stock: we only leave out what we know is gone.
    """
    if closed:
        return CartCheck((), (), tuple(i.sku for i in items))
    bought = set(bought_since)
    remaining, gone, got = [], [], []
    for item in items:
        if item.sku in bought:
            got.append(item.sku)
        elif online_available.get(item.sku, 1) <= 0:
            gone.append(item.sku)
        else:
            remaining.append(item)
    return CartCheck(tuple(remaining), tuple(gone), tuple(got))


def push_topic(notification_id: str) -> str:
    """The RFC 8030 ``Topic`` of a message: at most 32 URL-safe characters, stable per
    notification, so a resent message replaces the first at the push service."""
    return notification_id.replace("-", "")[:32]
