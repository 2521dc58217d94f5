"""Stock, locations and the rules that decide what a shopper is told and may buy.

Pure domain: no I/O. The service layer loads a snapshot of stock rows (while it holds the
SKUs' locks), asks these functions what changes, and writes the answers back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from enum import StrEnum

from omni_common.handlers import Refusal
from omni_contracts import AdjustmentKind, AvailabilityStatus


class LocationKind(StrEnum):
    """What a location is: a shop that serves shoppers, or a warehouse."""

    STORE = "store"
    WAREHOUSE = "warehouse"


@dataclass(frozen=True, slots=True)
class Location:
    """A store or warehouse and how it takes part in online selling."""

    location_id: str
    name: str
    kind: LocationKind
    ships_online: bool = False
    offers_pickup: bool = False
    # Units held back from online sale (phantom stock, shoplifting, units on display).
    safety_stock: int = 0
    low_stock_threshold: int = 5


@dataclass(frozen=True, slots=True)
class StockLevel:
    """Units of one SKU at one location: what is there and what is promised to orders."""

    sku: str
    location_id: str
    on_hand: int = 0
    reserved: int = 0

    @property
    def available(self) -> int:
        """Units that may still be sold: on hand and not reserved."""
        return self.on_hand - self.reserved


def stock_status(available: int, low_stock_threshold: int) -> AvailabilityStatus:
    """What a shopper is told about a SKU at a location with ``available`` units."""
    if available <= 0:
        return AvailabilityStatus.OUT_OF_STOCK
    if available <= low_stock_threshold:
        return AvailabilityStatus.LOW_STOCK
    return AvailabilityStatus.IN_STOCK


def sellable_online(level: StockLevel, location: Location) -> int:
    """Units of ``level`` that online orders may take: available less the safety stock."""
    return max(level.available - location.safety_stock, 0)


def online_available(levels: Iterable[StockLevel], locations: Mapping[str, Location]) -> int:
    """What web and app may sell for delivery: the sum over shipping locations of what each
    may sell online (never below zero per location: one store's deficit hides no other's
    stock)."""
    total = 0
    for level in levels:
        location = locations.get(level.location_id)
        if location is not None and location.ships_online:
            total += sellable_online(level, location)
    return total


# -- sales -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SaleOutcome:
    """A till sale applied to a stock level; ``shortfall`` > 0 asks for a recount."""

    level: StockLevel
    shortfall: int


def apply_sale(level: StockLevel, qty: int) -> SaleOutcome:
    """Take ``qty`` sold units off the shelf.

    A sale is a fact and is never refused. Units reserved for online orders are set aside
    in the back room, so a sale can only have taken what was available: selling more than
    that means the records were wrong. On-hand then floors at the reserved units (0 when none
    are reserved) and ``shortfall`` says how many units the records missed.
    """
    if qty <= 0:
        raise ValueError("a sale takes at least one unit")
    shortfall = max(qty - level.available, 0)
    on_hand = max(level.on_hand - qty, level.reserved)
    return SaleOutcome(replace(level, on_hand=on_hand), shortfall)


# -- adjustments -------------------------------------------------------------------------------


class ImpossibleAdjustment(Refusal):
    """An adjustment that cannot be true of the stock recorded (e.g. more damaged than held)."""


def apply_adjustment(
    level: StockLevel, kind: AdjustmentKind, *, delta: int | None, counted: int | None
) -> StockLevel:
    """Stock after a receipt, count, damage or transfer; raise if it cannot be right.

    A count sets on-hand absolutely; the others move it by ``delta``. The result may never
    be negative, nor leave fewer units than are reserved for orders: such an adjustment is
    refused (``ImpossibleAdjustment``) so that someone looks at it instead of stock silently
    going wrong.
    """
    if kind is AdjustmentKind.COUNT:
        if counted is None or counted < 0:
            raise ImpossibleAdjustment("impossible_count", f"counted {counted!r} units")
        if counted < level.reserved:
            raise ImpossibleAdjustment(
                "impossible_count",
                f"counted {counted} units of {level.sku} at {level.location_id} but "
                f"{level.reserved} are reserved for orders; release or fulfil them first",
            )
        return replace(level, on_hand=counted)
    if delta is None or delta == 0:
        raise ImpossibleAdjustment("impossible_adjustment", f"{kind} without a delta")
    on_hand = level.on_hand + delta
    if on_hand < 0:
        raise ImpossibleAdjustment(
            "impossible_adjustment",
            f"{kind} of {delta} units of {level.sku} at {level.location_id} "
            f"but only {level.on_hand} are on hand",
        )
    if on_hand < level.reserved:
        raise ImpossibleAdjustment(
            "impossible_adjustment",
            f"{kind} of {delta} units of {level.sku} at {level.location_id} would leave "
            f"{on_hand} on hand with {level.reserved} reserved for orders",
        )
    return replace(level, on_hand=on_hand)


# -- reservations ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderLine:
    """Units of one SKU an order asks for, and what each sells for."""

    sku: str
    qty: int
    unit_price: Decimal = Decimal(0)
    currency: str = "EUR"


@dataclass(frozen=True, slots=True)
class Hold:
    """Units of one SKU held for an order at one location."""

    sku: str
    location_id: str
    qty: int


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A SKU an order asked for more of than could be reserved."""

    sku: str
    requested: int
    available: int
    unit_price: Decimal = Decimal(0)
    currency: str = "EUR"

    @property
    def missing(self) -> int:
        """Units that could not be reserved."""
        return self.requested - self.available

    @property
    def lost_revenue(self) -> Decimal:
        """What the missing units would have sold for."""
        return self.unit_price * self.missing


@dataclass(frozen=True, slots=True)
class ReservationPlan:
    """The answer to a reservation: where each SKU is held, or what was short.

    All or nothing: exactly one of ``holds`` and ``shortfalls`` is non-empty.
    """

    holds: tuple[Hold, ...] = ()
    shortfalls: tuple[Shortfall, ...] = ()

    @property
    def confirmed(self) -> bool:
        """Whether every line can be reserved."""
        return not self.shortfalls


def merge_lines(lines: Iterable[OrderLine]) -> list[OrderLine]:
    """One line per SKU (an order may list a SKU twice), in first-seen order.

    The unit price of a merged line is the quantity-weighted mean of its parts.
    """
    merged: dict[str, OrderLine] = {}
    for line in lines:
        seen = merged.get(line.sku)
        if seen is None:
            merged[line.sku] = line
            continue
        qty = seen.qty + line.qty
        value = seen.unit_price * seen.qty + line.unit_price * line.qty
        merged[line.sku] = replace(seen, qty=qty, unit_price=value / qty)
    return list(merged.values())


def _shortfalls(lines: Iterable[OrderLine], sellable: Mapping[str, int]) -> tuple[Shortfall, ...]:
    return tuple(
        Shortfall(line.sku, line.qty, sellable.get(line.sku, 0), line.unit_price, line.currency)
        for line in lines
        if line.qty > sellable.get(line.sku, 0)
    )


def plan_pickup(
    lines: Iterable[OrderLine], store: Location, levels: Mapping[str, StockLevel]
) -> ReservationPlan:
    """Hold every line at the store the shopper collects from, or nothing.

    ``levels`` maps SKU to its stock at that store. Safety stock is held back from pickup
    orders as from every online order.
    """
    wanted = merge_lines(lines)
    sellable = {
        line.sku: sellable_online(
            levels.get(line.sku) or StockLevel(line.sku, store.location_id), store
        )
        for line in wanted
    }
    shortfalls = _shortfalls(wanted, sellable)
    if shortfalls:
        return ReservationPlan(shortfalls=shortfalls)
    return ReservationPlan(
        holds=tuple(Hold(line.sku, store.location_id, line.qty) for line in wanted)
    )


def plan_delivery(
    lines: Iterable[OrderLine],
    locations: Mapping[str, Location],
    levels: Iterable[StockLevel],
) -> ReservationPlan:
    """Hold every line at shipping locations, or nothing.

    One parcel is best: if a single shipping location can fill the whole order, it does (the
    one with most sellable units of the ordered SKUs, then the smallest ``location_id``).
    Otherwise each line comes from one location when one can fill it, else is split across
    locations, largest stock first. Ties always break by ``location_id``, so the same stock
    always gives the same answer.
    """
    wanted = merge_lines(lines)
    # sellable[sku][location_id]: units each shipping location may sell online.
    sellable: dict[str, dict[str, int]] = {line.sku: {} for line in wanted}
    for level in levels:
        location = locations.get(level.location_id)
        if level.sku not in sellable or location is None or not location.ships_online:
            continue
        units = sellable_online(level, location)
        if units > 0:
            sellable[level.sku][level.location_id] = units
    totals = {sku: sum(per_location.values()) for sku, per_location in sellable.items()}
    shortfalls = _shortfalls(wanted, totals)
    if shortfalls:
        return ReservationPlan(shortfalls=shortfalls)

    candidates = sorted({loc for per_location in sellable.values() for loc in per_location})
    whole_order = [
        loc
        for loc in candidates
        if all(sellable[line.sku].get(loc, 0) >= line.qty for line in wanted)
    ]
    if whole_order:
        best = min(
            whole_order, key=lambda loc: (-sum(sellable[line.sku][loc] for line in wanted), loc)
        )
        return ReservationPlan(holds=tuple(Hold(line.sku, best, line.qty) for line in wanted))

    holds: list[Hold] = []
    for line in wanted:
        ranked = sorted(sellable[line.sku].items(), key=lambda item: (-item[1], item[0]))
        single = [loc for loc, units in ranked if units >= line.qty]
        if single:
            holds.append(Hold(line.sku, single[0], line.qty))
            continue
        left = line.qty
        for loc, units in ranked:
            qty = min(units, left)
            holds.append(Hold(line.sku, loc, qty))
            left -= qty
            if left == 0:
                break
    return ReservationPlan(holds=tuple(holds))


def hold(level: StockLevel, qty: int) -> StockLevel:
    """Stock after ``qty`` units are reserved for an order."""
    if qty > level.available:
        raise ValueError(f"cannot hold {qty} of {level.available} available")
    return replace(level, reserved=level.reserved + qty)


def release(level: StockLevel, qty: int) -> StockLevel:
    """Stock after ``qty`` reserved units are given back (order cancelled, hold expired)."""
    return replace(level, reserved=max(level.reserved - qty, 0))


def fulfil(level: StockLevel, qty: int) -> StockLevel:
    """Stock after ``qty`` reserved units left the location (picked up or shipped)."""
    return replace(
        level, on_hand=max(level.on_hand - qty, 0), reserved=max(level.reserved - qty, 0)
    )


def restock(level: StockLevel, qty: int) -> StockLevel:
    """Stock after ``qty`` resellable units were handed back at this location."""
    return replace(level, on_hand=level.on_hand + qty)


# -- what channels are told --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AvailabilityUpdate:
    """The new availability of one SKU at one location, to tell web, app and stores."""

    level: StockLevel
    status: AvailabilityStatus
    previous_status: AvailabilityStatus
    online_available: int
    safety_stock: int

    @property
    def sold_out(self) -> bool:
        """Whether this change is the one that ran the location out of stock."""
        return (
            self.status is AvailabilityStatus.OUT_OF_STOCK
            and self.previous_status is not AvailabilityStatus.OUT_OF_STOCK
        )


Key = tuple[str, str]
"""A stock row's identity: (sku, location_id)."""


def availability_updates(
    before: Mapping[Key, StockLevel],
    after: Mapping[Key, StockLevel],
    told: Mapping[Key, AvailabilityStatus],
    locations: Mapping[str, Location],
    *,
    locations_before: Mapping[str, Location] | None = None,
) -> list[AvailabilityUpdate]:
    """What to tell channels after stock went from ``before`` to ``after``.

    ``before`` and ``after`` hold every stock row of the SKUs concerned (all locations, for
    ``online_available``); ``told`` is the status last published per row. A row is told
    about when its units changed; when a location's policy changed (``locations_before``
    given: safety stock, threshold, shipping), also when its status or the SKU's
    ``online_available`` did.
    """
    policy_changed = locations_before is not None
    old_locations = locations_before if locations_before is not None else locations
    by_sku_before: dict[str, list[StockLevel]] = {}
    by_sku_after: dict[str, list[StockLevel]] = {}
    for (sku, _), level in before.items():
        by_sku_before.setdefault(sku, []).append(level)
    for (sku, _), level in after.items():
        by_sku_after.setdefault(sku, []).append(level)
    online_before = {
        sku: online_available(by_sku_before.get(sku, ()), old_locations) for sku in by_sku_after
    }
    online_after = {
        sku: online_available(levels, locations) for sku, levels in by_sku_after.items()
    }

    updates: list[AvailabilityUpdate] = []
    for key in sorted(after):
        sku, location_id = key
        level = after[key]
        location = locations.get(location_id)
        if location is None:
            continue
        old = before.get(key, StockLevel(sku, location_id))
        previous = told.get(key, AvailabilityStatus.OUT_OF_STOCK)
        status = stock_status(level.available, location.low_stock_threshold)
        units_changed = (old.on_hand, old.reserved) != (level.on_hand, level.reserved)
        told_changed = status is not previous or online_before[sku] != online_after[sku]
        # A policy change is told once per SKU stocked where it changed; its new
        # online_available reaches channels through that row.
        moved_here = policy_changed and old_locations.get(location_id) != location
        if units_changed or (moved_here and told_changed):
            updates.append(
                AvailabilityUpdate(
                    level, status, previous, online_after[sku], location.safety_stock
                )
            )
    return updates
