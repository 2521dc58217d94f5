"""What each signal said, kept as facts, and the profile derived from them (pure, no I/O).

Signals about one shopper travel on different topics and partitions, so no order holds
between them. The profile therefore keeps, per field, the answer a shopper gave and when
(a last-writer-wins register stamped with the event's time and id), and derives what it
shows from those facts: any order of arrival gives the same profile.

Facts are kept per **origin**, the customer id the signal named. A merge puts two origins'
facts side by side (remembering when each joined, and through whom); an unmerge takes the
merged origins' facts out again, so the restored profile is rebuilt from what was its own.

Consent across origins: per channel and purpose the most restrictive answer wins (a "no"
given on either profile is never lost to a merge); a newer answer replaces an older one
only when it is the same shopper's, that is from the same origin or given after the older
answer's origin joined the profile.

The facts are plain JSON-able dicts (stored as ``jsonb``); stamps are ``[at, tie]`` with
``at`` a fixed-width UTC text, so comparing lists orders them by time, then by event id.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Facts = dict[str, Any]
"""A profile's facts: ``{"origins": {origin: OriginFacts}, "joined": {origin: {...}}}``."""

Stamp = list[str]
"""``[at, tie]``: when an answer was given (fixed-width UTC) and the event's id."""

CONTACT_FIELDS = ("email", "phone", "first_name", "last_name")
PREFERENCE_FIELDS = (
    "preferred_channel",
    "language",
    "time_zone",
    "quiet_hours_start",
    "quiet_hours_end",
)
CONSENT_GROUPS = ("consents", "transactional_consents")
CONSENT_CHANNELS = ("email", "push", "sms")
SUBSCRIPTION_KEYS = ("p256dh", "auth")
# Tombstones (removed devices) and devices found gone kept per origin: enough to outlast
# reordering and channels re-sending what they stored, bounded.
MAX_TOMBSTONES = 50


def stamp(at: datetime, tie: str = "") -> Stamp:
    """The stamp of an answer given at ``at`` by the event ``tie`` (its id)."""
    return [at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), tie]


def empty() -> Facts:
    """The facts of a profile nobody told anything yet."""
    return {"origins": {}, "joined": {}}


def _origin(facts: Facts, origin: str) -> dict[str, Any]:
    return facts["origins"].setdefault(
        origin,
        {"fields": {}, "verified": {}, "tokens": {}, "subs": {}, "cleared": {}, "gone": {}},
    )


def _put(registers: dict[str, Any], key: str, value: Any, at: Stamp) -> bool:
    """Set a last-writer-wins register; False when a newer answer is already there."""
    old = registers.get(key)
    if old is not None and old[1] >= at:
        return False
    registers[key] = [value, at]
    return True


def clean_subscription(sub: Mapping[str, Any]) -> dict[str, Any]:
    """A Web Push subscription with only the keys Web Push uses (unknown keys dropped)."""
    keys = sub.get("keys") or {}
    cleaned: dict[str, Any] = {
        "endpoint": sub["endpoint"],
        "keys": {k: keys[k] for k in SUBSCRIPTION_KEYS if k in keys},
    }
    if sub.get("expirationTime") is not None:
        cleaned["expirationTime"] = sub["expirationTime"]
    return cleaned


@dataclass(frozen=True)
class ContactChange:
    """What a ``customer.contact.updated`` said (values already normalised)."""

    email: str | None = None
    email_verified: bool = False
    phone: str | None = None
    phone_verified: bool = False
    push_token: str | None = None
    push_subscription: Mapping[str, Any] | None = None
    cleared: frozenset[str] = frozenset()
    # Devices a push service said are gone (endpoints and app tokens).
    gone_endpoints: tuple[str, ...] = ()
    gone_tokens: tuple[str, ...] = ()


def apply_contact(facts: Facts, origin: str, change: ContactChange, at: Stamp) -> None:
    """Record a contact change of ``origin`` given at ``at`` (in place)."""
    mine = _origin(facts, origin)
    for name, value, verified in (
        ("email", change.email, change.email_verified),
        ("phone", change.phone, change.phone_verified),
    ):
        if value is not None:
            _put(mine["fields"], name, value, at)
            if verified:
                known = mine["verified"].setdefault(name, [])
                if value not in known:
                    known.append(value)
        if name in change.cleared:
            _put(mine["fields"], name, None, at)
    if change.push_token is not None:
        _put(mine["tokens"], change.push_token, True, at)
    if change.push_subscription is not None:
        sub = clean_subscription(change.push_subscription)
        _put(mine["subs"], sub["endpoint"], sub, at)
    for what in ("push_token", "push_subscription"):
        if what in change.cleared and (mine["cleared"].get(what) or ["", ""]) < at:
            mine["cleared"][what] = at
    for part, keys in (("subs", change.gone_endpoints), ("tokens", change.gone_tokens)):
        for key in keys:
            _bury(mine, part, key, at)


def _bury(mine: dict[str, Any], part: str, key: str, at: Stamp) -> None:
    """Record a device a push service found gone: gone for good, whatever the stamps say.

    The verdict cannot lose to a registration's stamp: notification only knew the device
    from a snapshot, so the registration came first, even when the channel's clock is
    ahead of notification's (as a last-writer-wins register the verdict lost there, and
    the next snapshot brought the device back). A push service never hands a gone endpoint
    or token out again, so a later registration of it is a channel re-sending what it
    stored, and is ignored too: whatever the order, the same profile.
    """
    gone = mine.setdefault("gone", {}).setdefault(part, {})
    if gone.get(key, ["", ""]) < at:
        gone[key] = at


def _gone(own: Mapping[str, Any], part: str) -> Mapping[str, Stamp]:
    # Facts stored before devices could be found gone have no "gone".
    return (own.get("gone") or {}).get(part) or {}


def apply_preferences(facts: Facts, origin: str, given: Mapping[str, Any], at: Stamp) -> None:
    """Record the non-null preferences ``origin`` gave at ``at`` (unknown keys dropped)."""
    mine = _origin(facts, origin)
    for name in PREFERENCE_FIELDS:
        if given.get(name) is not None:
            _put(mine["fields"], f"pref.{name}", given[name], at)
    for group in CONSENT_GROUPS:
        answers = given.get(group) or {}
        for channel in CONSENT_CHANNELS:
            if answers.get(channel) is not None:
                _put(mine["fields"], f"{group}.{channel}", bool(answers[channel]), at)


def apply_name(facts: Facts, origin: str, first: str | None, last: str | None, at: Stamp) -> None:
    """Record a shopper's name (non-null parts)."""
    mine = _origin(facts, origin)
    for name, value in (("first_name", first), ("last_name", last)):
        if value is not None:
            _put(mine["fields"], name, value, at)


def touch(facts: Facts, origin: str) -> None:
    """Make ``origin`` known to the facts (a signal that says nothing about contact)."""
    _origin(facts, origin)


# -- merging and unmerging -----------------------------------------------------------------


def merge(survivor: Facts, merged: Facts, merged_id: str, at: datetime) -> Facts:
    """The facts of ``survivor`` with those of ``merged`` (merged at ``at``) beside them."""
    out = copy.deepcopy(survivor)
    when = stamp(at)[0]
    for origin, own in merged["origins"].items():
        mine = out["origins"].get(origin)
        out["origins"][origin] = own if mine is None else _union(mine, own)
        out["joined"][origin] = {"at": when, "via": merged_id}
    return out


def _union(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for part in ("fields", "tokens", "subs"):
        for key, (value, at) in b[part].items():
            _put(out[part], key, value, at)
    for name, values in b["verified"].items():
        known = out["verified"].setdefault(name, [])
        known += [v for v in values if v not in known]
    for what, at in b["cleared"].items():
        if (out["cleared"].get(what) or ["", ""]) < at:
            out["cleared"][what] = at
    for part in ("subs", "tokens"):
        for key, at in _gone(b, part).items():
            gone = out.setdefault("gone", {}).setdefault(part, {})
            if gone.get(key, ["", ""]) < at:
                gone[key] = at
    return out


def origins_via(facts: Facts, merged_id: str) -> set[str]:
    """The origins that joined through ``merged_id`` (itself included)."""
    found = {merged_id}
    grew = True
    while grew:  # an origin that joined the merged profile earlier came along with it
        grew = False
        for origin, joined in facts["joined"].items():
            if joined["via"] in found and origin not in found:
                found.add(origin)
                grew = True
    return found & set(facts["origins"]) | {merged_id}


def split(facts: Facts, merged_id: str) -> tuple[Facts, Facts]:
    """``(survivor's, restored)``: the facts of the origins that joined through
    ``merged_id`` taken out again (an unmerge)."""
    leaving = origins_via(facts, merged_id)
    kept, restored = empty(), empty()
    for origin, own in facts["origins"].items():
        (restored if origin in leaving else kept)["origins"][origin] = copy.deepcopy(own)
    for origin, joined in facts["joined"].items():
        if origin == merged_id:
            continue
        (restored if origin in leaving else kept)["joined"][origin] = dict(joined)
    return kept, restored


# -- deriving the profile ------------------------------------------------------------------


@dataclass
class Derived:
    """The profile the facts say: contact, preferences and devices (bounded)."""

    email: str | None = None
    phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    push_tokens: list[str] = field(default_factory=list)
    push_subscriptions: list[dict[str, Any]] = field(default_factory=list)
    preferences: dict[str, Any] = field(default_factory=dict)
    # Devices beyond the bound, oldest first: dropped, and said so by the caller.
    dropped_devices: list[str] = field(default_factory=list)


Answer = tuple[str, Any, Stamp]
"""``(origin, value, stamp)``."""


def _standing(answers: list[Answer], joined: Mapping[str, Mapping[str, str]]) -> list[Answer]:
    """The answers no newer answer of the same shopper replaced.

    ``b`` replaces ``a`` when newer and from the same origin, or given after ``a``'s origin
    joined the profile (then it is the merged shopper's answer, knowing both).
    """

    def replaced(a: Answer) -> bool:
        joined_at = (joined.get(a[0]) or {}).get("at")
        return any(
            b[2] > a[2] and (b[0] == a[0] or (joined_at is not None and b[2][0] > joined_at))
            for b in answers
        )

    return [a for a in answers if not replaced(a)]


def _answers(facts: Facts, key: str) -> list[Answer]:
    found: list[Answer] = []
    for origin, own in facts["origins"].items():
        if key in own["fields"]:
            value, at = own["fields"][key]
            found.append((origin, value, at))
    return found


def _pick(standing: list[Answer], survivor: str) -> Any:
    """The survivor's own answer if it has one, else the newest."""
    if not standing:
        return None
    own = [a for a in standing if a[0] == survivor]
    return max(own or standing, key=lambda a: a[2])[1]


def derive(facts: Facts, survivor: str, max_devices: int) -> Derived:
    """The profile ``survivor`` shows, from its facts (any order of arrival, same result)."""
    joined = facts["joined"]
    out = Derived()
    for name in CONTACT_FIELDS:
        setattr(out, name, _pick(_standing(_answers(facts, name), joined), survivor))
    prefs: dict[str, Any] = {}
    for name in PREFERENCE_FIELDS:
        value = _pick(_standing(_answers(facts, f"pref.{name}"), joined), survivor)
        if value is not None:
            prefs[name] = value
    for group in CONSENT_GROUPS:
        answers: dict[str, bool] = {}
        for channel in CONSENT_CHANNELS:
            standing = _standing(_answers(facts, f"{group}.{channel}"), joined)
            if standing:
                # Most restrictive: one standing "no" is a no.
                answers[channel] = all(a[1] for a in standing)
        if answers:
            prefs[group] = answers
    out.preferences = prefs
    devices = _devices(facts)
    devices.sort(key=lambda d: (d[2], d[1]), reverse=True)
    for kind, key, _at, value in devices[:max_devices]:
        if kind == "sub":
            out.push_subscriptions.append(value)
        else:
            out.push_tokens.append(key)
    out.dropped_devices = [d[1] for d in reversed(devices[max_devices:])]
    # A stable order for snapshots: oldest device first.
    out.push_subscriptions.reverse()
    out.push_tokens.reverse()
    return out


def _devices(facts: Facts) -> list[tuple[str, str, Stamp, Any]]:
    """Every registered device still there: ``(kind, key, stamp, subscription)``."""
    latest: dict[tuple[str, str], tuple[Stamp, Any]] = {}
    # Found gone under any origin is gone: the device is the push service's, not a shopper's.
    gone = {
        (kind, key)
        for own in facts["origins"].values()
        for kind, part in (("sub", "subs"), ("token", "tokens"))
        for key in _gone(own, part)
    }
    for own in facts["origins"].values():
        for kind, part, cleared_by in (
            ("sub", "subs", "push_subscription"),
            ("token", "tokens", "push_token"),
        ):
            cleared = own["cleared"].get(cleared_by) or ["", ""]
            for key, (value, at) in own[part].items():
                if at <= cleared:
                    value = None
                old = latest.get((kind, key))
                if old is None or old[0] < at:
                    latest[(kind, key)] = (at, value)
    return [
        (k, key, at, v)
        for (k, key), (at, v) in latest.items()
        if v is not None and (k, key) not in gone
    ]


def prune(facts: Facts, max_devices: int) -> list[str]:
    """Forget devices beyond the bound and old tombstones (in place); the devices dropped.

    Without this the facts of a shopper re-registering devices would grow without end.
    """
    keep = {key for _k, key, _a, _v in sorted(_devices(facts), key=lambda d: d[2])[-max_devices:]}
    dropped: list[str] = []
    for own in facts["origins"].values():
        for part in ("subs", "tokens"):
            gone = _gone(own, part)
            live = [(at, key) for key, (value, at) in own[part].items() if value is not None]
            for _at, key in live:
                if key not in keep:
                    if key not in gone:  # a gone device is not dropped, it is gone
                        dropped.append(key)
                    own[part][key] = [None, own[part][key][1]]
            dead = sorted((at, key) for key, (value, at) in own[part].items() if value is None)
            for _at, key in dead[:-MAX_TOMBSTONES] if len(dead) > MAX_TOMBSTONES else []:
                del own[part][key]
            if len(gone) > MAX_TOMBSTONES:
                oldest = sorted(gone, key=lambda k: gone[k])[:-MAX_TOMBSTONES]
                for key in oldest:
                    del own["gone"][part][key]
    return dropped


def verified_contacts(facts: Facts, origin: str) -> dict[str, str]:
    """The e-mail and phone ``origin`` holds now that were verified (what may merge)."""
    own = facts["origins"].get(origin)
    if own is None:
        return {}
    found: dict[str, str] = {}
    for name in ("email", "phone"):
        current = own["fields"].get(name)
        if current is not None and current[0] in own["verified"].get(name, []):
            found[name] = current[0]
    return found


def origins(facts: Facts) -> Iterable[str]:
    """Every origin whose facts the profile holds."""
    return facts["origins"].keys()
