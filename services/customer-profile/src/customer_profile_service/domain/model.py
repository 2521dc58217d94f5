"""The customer-profile domain: identifiers, identity-resolution guards and cart abandonment.

Pure functions and values, no I/O. The guards follow Segment's identity resolution: blocked
values never identify anyone, each identifier kind has a limit per profile, and a shared
device (an anonymous id already linked to another known customer) never merges customers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from omni_common.handlers import Refusal


class IdKind(StrEnum):
    """A kind of identifier a profile holds."""

    ANONYMOUS_ID = "anonymous_id"
    EMAIL = "email"
    PHONE = "phone"
    LOYALTY_CARD = "loyalty_card"


# Identifier kinds that prove two profiles are one shopper. A device does not: many shoppers
# use one store tablet or family computer.
MERGING_KINDS = frozenset({IdKind.EMAIL, IdKind.PHONE, IdKind.LOYALTY_CARD})

DEFAULT_LIMITS: Mapping[IdKind, int] = {
    IdKind.ANONYMOUS_ID: 5,
    IdKind.EMAIL: 1,
    IdKind.PHONE: 2,
    IdKind.LOYALTY_CARD: 2,
}

# Placeholder values that POS and forms send for "nobody": they must never join profiles.
DEFAULT_BLOCKED = frozenset(
    {"", "anonymous", "unknown", "none", "null", "undefined", "n/a", "na", "-1", "0", "test"}
)

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE_NOISE = re.compile(r"[\s().\-]")
_PHONE = re.compile(r"^\+?\d{6,15}$")


class ProfileError(Refusal):
    """A signal the profile refuses; ``reason`` is the DLQ reason."""


def normalise(kind: IdKind, value: str) -> str:
    """The canonical form an identifier is stored and looked up in."""
    value = value.strip()
    if kind is IdKind.EMAIL:
        return value.lower()
    if kind is IdKind.PHONE:
        return _PHONE_NOISE.sub("", value)
    return value


def is_blocked(value: str, blocked: Iterable[str] = DEFAULT_BLOCKED) -> bool:
    """Whether ``value`` (normalised) is a placeholder that identifies nobody.

    Besides the listed values, anything made only of zeros (``0000``, ``000-000``) is blocked.
    """
    v = value.strip().lower()
    if v in blocked:
        return True
    digits = re.sub(r"[^0-9a-z]", "", v)
    return digits == "" or set(digits) == {"0"}


def validate_contact(kind: IdKind, value: str) -> str:
    """The normalised e-mail or phone, or :class:`ProfileError` ``invalid_contact``."""
    norm = normalise(kind, value)
    if kind is IdKind.EMAIL and not _EMAIL.match(norm):
        raise ProfileError("invalid_contact", "email is not an e-mail address")
    if kind is IdKind.PHONE and not _PHONE.match(norm):
        raise ProfileError("invalid_contact", "phone is not a phone number (6-15 digits)")
    return norm


def parse_limits(spec: str) -> dict[IdKind, int]:
    """``"email=1,anonymous_id=5"`` -> limits per kind, over the defaults."""
    limits = dict(DEFAULT_LIMITS)
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, number = item.partition("=")
        if not sep:
            raise ValueError(f"identity limit {item!r} is not KIND=N")
        limits[IdKind(name.strip())] = int(number)
    return limits


class Skip(StrEnum):
    """Why an identifier was recorded but not applied."""

    BLOCKED_VALUE = "blocked_value"
    IDENTIFIER_LIMIT = "identifier_limit"
    SHARED_DEVICE = "shared_device"


@dataclass(frozen=True)
class Claim:
    """What to do with an identifier a profile presents: add it, merge, or skip (why)."""

    action: str  # "add", "known", "merge", "skip"
    skip: Skip | None = None
    other: str | None = None


def decide_claim(
    kind: IdKind,
    value: str,
    customer_id: str,
    owner: str | None,
    counts: Mapping[IdKind, int],
    other_counts: Mapping[IdKind, int] | None,
    limits: Mapping[IdKind, int],
    blocked: Iterable[str] = DEFAULT_BLOCKED,
) -> Claim:
    """Decide what ``customer_id`` presenting identifier ``(kind, value)`` leads to.

    ``owner`` is the profile holding the identifier now (None: nobody), ``counts`` the
    identifiers per kind ``customer_id`` holds and ``other_counts`` those of ``owner``.
    """
    if is_blocked(value, blocked):
        return Claim("skip", Skip.BLOCKED_VALUE)
    if owner == customer_id:
        return Claim("known")
    if owner is None:
        if counts.get(kind, 0) >= limits[kind]:
            return Claim("skip", Skip.IDENTIFIER_LIMIT)
        return Claim("add")
    if kind not in MERGING_KINDS:
        return Claim("skip", Skip.SHARED_DEVICE, owner)
    combined = {k: counts.get(k, 0) + (other_counts or {}).get(k, 0) for k in IdKind}
    # The shared identifier is held by ``owner`` only, so the sum counts it once.
    if any(combined[k] > limits[k] for k in IdKind):
        return Claim("skip", Skip.IDENTIFIER_LIMIT, owner)
    return Claim("merge", other=owner)


def survivor(a: tuple[str, datetime], b: tuple[str, datetime]) -> tuple[str, str]:
    """``(surviving_id, merged_id)`` of two profiles ``(customer_id, created_at)``: the older
    one survives (ties: the smaller id, so every instance decides alike)."""
    first, second = sorted([a, b], key=lambda p: (p[1], p[0]))
    return first[0], second[0]


# -- carts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CartLine:
    """One line of a cart."""

    sku: str
    qty: int
    unit_price: Decimal
    currency: str


def contents_hash(lines: Iterable[CartLine]) -> str:
    """A fingerprint of a cart's contents (order-insensitive): what was announced."""
    canonical = sorted(f"{ln.sku}\x1f{ln.qty}\x1f{ln.unit_price}" for ln in lines)
    return hashlib.sha256("\x1e".join(canonical).encode()).hexdigest()[:32]


def cart_value(lines: Iterable[CartLine]) -> Decimal:
    """The value of a cart's contents."""
    return sum((ln.unit_price * ln.qty for ln in lines), Decimal("0"))


class CartSkip(StrEnum):
    """Why an abandonment was not announced (the ``reason`` label of the skip counter)."""

    CHECKED_OUT = "checked_out"
    EMPTIED = "emptied"
    PURCHASED = "purchased"
    ANONYMOUS = "anonymous"
    ALREADY_ANNOUNCED = "already_announced"
    ERASED = "erased"


@dataclass(frozen=True)
class CartLimits:
    """Bounds on a cart a channel may send (beyond them the event is refused)."""

    max_lines: int = 200
    max_qty: int = 999


def check_cart(lines: list[CartLine], limits: CartLimits) -> None:
    """Refuse a cart beyond the limits with :class:`ProfileError` ``cart_too_large``."""
    if len(lines) > limits.max_lines:
        raise ProfileError(
            "cart_too_large", f"{len(lines)} lines; at most {limits.max_lines} are accepted"
        )
    for ln in lines:
        if ln.qty > limits.max_qty:
            raise ProfileError(
                "cart_too_large", f"{ln.qty} x {ln.sku}; at most {limits.max_qty} per line"
            )


def covered_by(cart_skus: Iterable[str], bought_skus: Iterable[str]) -> bool:
    """Whether a purchase took every SKU of the cart (then no reminder is due)."""
    cart = set(cart_skus)
    return bool(cart) and cart <= set(bought_skus)


@dataclass
class Abandonment:
    """The verdict on a cart whose timer fired: announce it, or skip it and why."""

    announce: bool
    skip: CartSkip | None = None
    notes: list[str] = field(default_factory=list)


def judge_abandonment(
    *,
    status: str,
    owner: str | None,
    erased: bool,
    hash_now: str,
    announced_hash: str | None,
    bought_after_activity: bool,
) -> Abandonment:
    """Decide what a fired cart timer does (pure: the caller loaded the facts)."""
    if status == "checked_out":
        return Abandonment(False, CartSkip.CHECKED_OUT)
    if status == "emptied":
        return Abandonment(False, CartSkip.EMPTIED)
    if status == "purchased" or bought_after_activity:
        return Abandonment(False, CartSkip.PURCHASED)
    if owner is None:
        return Abandonment(False, CartSkip.ANONYMOUS)
    if erased:
        return Abandonment(False, CartSkip.ERASED)
    if announced_hash == hash_now:
        return Abandonment(False, CartSkip.ALREADY_ANNOUNCED)
    return Abandonment(True)
