"""The loyalty programme's rules: earning, holding, reversing, tiers and offers.

Pure: no I/O, no clock. The service layer loads what a decision needs, asks these functions,
and writes the outcome (ledger entries, balances, events) in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from enum import StrEnum

from omni_contracts import RefusalReason

CENT = Decimal("0.01")

ROUNDING = {"down": ROUND_FLOOR, "half_up": ROUND_HALF_UP, "up": ROUND_CEILING}
"""How earned points are rounded (``LOYALTY_ROUNDING``)."""


class EntryKind(StrEnum):
    """What a ledger entry records (each moves points between the account's buckets)."""

    PENDING = "pending"  # earned, not spendable until the return window closes
    EARNED = "earned"  # earned and spendable at once (or moved in with a linked card)
    AVAILABLE = "available"  # pending -> available
    HELD = "held"  # available -> held, for a checkout
    REDEEMED = "redeemed"  # held -> spent
    RELEASED = "released"  # held (or spent on a cancelled order) -> available
    REVERSED = "reversed"  # taken back (returned items) or given back (redeemed on them)
    EXPIRED = "expired"  # available -> gone, after inactivity
    MOVED_OUT = "moved_out"  # a card's points left for the customer who linked the card
    ADJUSTED = "adjusted"  # a manual correction


@dataclass(frozen=True)
class Buckets:
    """A signed change to an account's buckets; ``available`` is the spendable balance."""

    available: int = 0
    pending: int = 0
    held: int = 0
    lifetime: int = 0


@dataclass(frozen=True)
class Tier:
    """A tier: reached with ``spend`` qualifying spend over 12 months, earning x multiplier."""

    name: str
    spend: Decimal
    multiplier: Decimal


@dataclass(frozen=True)
class EarnedLine:
    """Points earned on one SKU of a purchase."""

    sku: str
    qty: int
    value: Decimal
    points: int


@dataclass(frozen=True)
class EarnRules:
    """Points per currency unit, what a point is worth, and the tiers."""

    points_per_unit: Decimal
    point_value: Decimal
    tiers: tuple[Tier, ...]
    rounding: str = "down"

    def tier(self, name: str | None) -> Tier:
        """The tier called ``name`` (the lowest one when unknown or None)."""
        return next((t for t in self.tiers if t.name == name), self.tiers[0])

    def earn(self, lines: Iterable[tuple[str, int, Decimal]], tier: str | None) -> list[EarnedLine]:
        """Points on each ``(sku, qty, unit_price)`` line, rounded per SKU (down by default).

        Lines of one SKU are added up first, so a return of that SKU finds one figure.
        """
        by_sku: dict[str, tuple[int, Decimal]] = {}
        for sku, qty, price in lines:
            q, v = by_sku.get(sku, (0, Decimal(0)))
            by_sku[sku] = (q + qty, v + price * qty)
        rate = self.points_per_unit * self.tier(tier).multiplier
        mode = ROUNDING[self.rounding]
        return [
            EarnedLine(sku, qty, value, int((value * rate).to_integral_value(mode)))
            for sku, (qty, value) in by_sku.items()
        ]

    def value_of(self, points: int) -> Decimal:
        """What ``points`` are worth at checkout, in currency units (to the cent, down)."""
        return (self.point_value * points).quantize(CENT, rounding=ROUND_FLOOR)

    def tier_for(self, spend: Decimal) -> Tier:
        """The highest tier that ``spend`` qualifies for."""
        reached = self.tiers[0]
        for tier in self.tiers:
            if spend >= tier.spend:
                reached = tier
        return reached

    def rank(self, name: str | None) -> int:
        """Position of a tier, lowest 0."""
        tier = self.tier(name)
        return self.tiers.index(tier)


def refusal(has_account: bool, available: int, wanted: int) -> RefusalReason | None:
    """Why ``wanted`` points cannot be held, or None when they can.

    The hold itself is a conditional update (``available >= wanted``): this decides what to
    tell the order service, the database decides who wins a race.
    """
    if not has_account:
        return RefusalReason.UNKNOWN_MEMBER
    if available < wanted:
        return RefusalReason.INSUFFICIENT_POINTS
    return None


def points_for_units(line_points: int, line_qty: int, units: int) -> int:
    """The points of ``units`` of a line earning ``line_points`` on ``line_qty`` units.

    Rounded down, and cumulative: the reversal of units ``a..b`` is
    ``points_for_units(b) - points_for_units(a)``, so returning every unit in any number of
    returns reverses exactly what was earned, never more.
    """
    if line_qty <= 0:
        return 0
    units = max(0, min(units, line_qty))
    return line_points * units // line_qty


def reversal(
    earned: Sequence[EarnedLine],
    returned_before: Mapping[str, int],
    returned_now: Mapping[str, int],
) -> tuple[int, dict[str, int]]:
    """Points to take back for ``returned_now`` units per SKU, and the new returned counts.

    Units beyond what was bought (or SKUs not earned on) reverse nothing.
    """
    total = 0
    after = dict(returned_before)
    for line in earned:
        now = returned_now.get(line.sku, 0)
        if not now:
            continue
        before = returned_before.get(line.sku, 0)
        new = min(line.qty, before + now)
        total += points_for_units(line.points, line.qty, new) - points_for_units(
            line.points, line.qty, before
        )
        after[line.sku] = new
    return total, after


def give_back(
    redeemed: int, gross: Decimal, returned_value_before: Decimal, returned_value_now: Decimal
) -> int:
    """Redeemed points given back for goods worth ``returned_value_now`` handed back.

    In proportion to the goods' share of the order (as the refund is), rounded down and
    cumulative, so all returns together give back at most ``redeemed``.
    """
    if redeemed <= 0 or gross <= 0:
        return 0

    def share(value: Decimal) -> int:
        value = min(max(value, Decimal(0)), gross)
        return int((redeemed * value / gross).to_integral_value(ROUND_FLOOR))

    return share(returned_value_before + returned_value_now) - share(returned_value_before)


def upgrade(rules: EarnRules, current: str | None, spend: Decimal) -> Tier | None:
    """The tier to move up to at once after a purchase, or None (tiers never drop here)."""
    reached = rules.tier_for(spend)
    return reached if rules.rank(reached.name) > rules.rank(current) else None


def review(rules: EarnRules, current: str | None, spend: Decimal) -> Tier | None:
    """At the review date: the tier the last 12 months' spend earns, if it differs."""
    reached = rules.tier_for(spend)
    return reached if reached.name != rules.tier(current).name else None


def pick_offer(
    together: Sequence[tuple[str, int]],
    *,
    bought: Iterable[str],
    in_stock: Iterable[str],
) -> str | None:
    """The SKU to offer: the most often bought with the purchase (``together`` is ``(sku,
    count)``, best first), that the shopper never bought and that is in stock for them."""
    owned, stocked = set(bought), set(in_stock)
    for sku, count in together:
        if count > 0 and sku not in owned and sku in stocked:
            return sku
    return None


def pairs(skus: Iterable[str], limit: int = 20) -> list[tuple[str, str]]:
    """Every ordered pair of distinct SKUs bought together (bounded: big baskets say less)."""
    distinct = sorted(set(skus))[:limit]
    return [(a, b) for a in distinct for b in distinct if a != b]


@dataclass
class Account:
    """A shopper's (or a not yet linked card's) points, as the ledger sums them up."""

    account_id: int
    customer_id: str | None
    available: int
    pending: int
    held: int
    lifetime: int
    tier: str
    tier_review_at: datetime | None = None
    preferred_store: str | None = None
    last_activity_at: datetime | None = None
    erased: bool = False

    @property
    def announced(self) -> bool:
        """Whether its entries are published (a card's account has nobody to tell yet, an
        erased one nobody to name)."""
        return self.customer_id is not None and not self.erased
