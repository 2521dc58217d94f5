"""The inventory domain, with no I/O: stock status, online availability, sales,
adjustments, reservation plans and what channels are told."""

from __future__ import annotations

from decimal import Decimal

import pytest
from inventory_service.domain import (
    Hold,
    ImpossibleAdjustment,
    Location,
    LocationKind,
    OrderLine,
    StockLevel,
    apply_adjustment,
    apply_sale,
    availability_updates,
    fulfil,
    hold,
    merge_lines,
    online_available,
    plan_delivery,
    plan_pickup,
    release,
    restock,
    stock_status,
)
from omni_contracts import AdjustmentKind, AvailabilityStatus

IN, LOW, OUT = (
    AvailabilityStatus.IN_STOCK,
    AvailabilityStatus.LOW_STOCK,
    AvailabilityStatus.OUT_OF_STOCK,
)


def store(
    location_id: str,
    *,
    ships: bool = True,
    pickup: bool = True,
    safety: int = 0,
    threshold: int = 2,
) -> Location:
    return Location(location_id, location_id, LocationKind.STORE, ships, pickup, safety, threshold)


def warehouse(location_id: str, *, safety: int = 0) -> Location:
    return Location(location_id, location_id, LocationKind.WAREHOUSE, True, False, safety, 10)


# -- status and online availability ------------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "threshold", "expected"),
    [(0, 3, OUT), (-1, 3, OUT), (1, 3, LOW), (3, 3, LOW), (4, 3, IN), (1, 0, IN), (0, 0, OUT)],
)
def test_status_follows_available_units_and_threshold(
    available: int, threshold: int, expected: AvailabilityStatus
) -> None:
    assert stock_status(available, threshold) is expected


def test_online_available_sums_shipping_locations_net_of_safety_stock() -> None:
    locations = {
        "s1": store("s1", safety=2),
        "s2": store("s2", ships=False),
        "w1": warehouse("w1", safety=5),
    }
    levels = [
        StockLevel("A", "s1", on_hand=10, reserved=3),  # 7 available - 2 safety = 5
        StockLevel("A", "s2", on_hand=50),  # does not ship online
        StockLevel("A", "w1", on_hand=4),  # below its safety stock: 0, never negative
        StockLevel("A", "gone", on_hand=9),  # unknown location: ignored
    ]
    assert online_available(levels, locations) == 5


# -- sales -------------------------------------------------------------------------------------


def test_sale_takes_units_off_the_shelf() -> None:
    result = apply_sale(StockLevel("A", "s1", on_hand=5, reserved=1), 3)
    assert result.level == StockLevel("A", "s1", on_hand=2, reserved=1)
    assert result.shortfall == 0


def test_sale_beyond_recorded_stock_floors_at_zero_and_reports_the_shortfall() -> None:
    result = apply_sale(StockLevel("A", "s1", on_hand=2), 5)
    assert result.level.on_hand == 0
    assert result.shortfall == 3


def test_sale_never_eats_units_reserved_for_orders() -> None:
    result = apply_sale(StockLevel("A", "s1", on_hand=5, reserved=3), 4)
    assert result.level == StockLevel("A", "s1", on_hand=3, reserved=3)
    assert result.shortfall == 2


# -- adjustments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "delta", "counted", "on_hand"),
    [
        (AdjustmentKind.RECEIPT, 10, None, 15),
        (AdjustmentKind.TRANSFER_IN, 1, None, 6),
        (AdjustmentKind.DAMAGE, -2, None, 3),
        (AdjustmentKind.TRANSFER_OUT, -3, None, 2),
        (AdjustmentKind.COUNT, None, 9, 9),
        (AdjustmentKind.COUNT, None, 1, 1),
    ],
)
def test_adjustments_move_or_set_on_hand(
    kind: AdjustmentKind, delta: int | None, counted: int | None, on_hand: int
) -> None:
    level = StockLevel("A", "s1", on_hand=5, reserved=1)
    assert apply_adjustment(level, kind, delta=delta, counted=counted).on_hand == on_hand


@pytest.mark.parametrize(
    ("kind", "delta", "counted", "reason"),
    [
        (AdjustmentKind.DAMAGE, -6, None, "impossible_adjustment"),  # more than on hand
        (AdjustmentKind.TRANSFER_OUT, -5, None, "impossible_adjustment"),  # reserved units
        (AdjustmentKind.COUNT, None, 0, "impossible_count"),  # fewer than reserved
        (AdjustmentKind.COUNT, None, -1, "impossible_count"),
        (AdjustmentKind.RECEIPT, None, None, "impossible_adjustment"),
    ],
)
def test_impossible_adjustments_are_refused(
    kind: AdjustmentKind, delta: int | None, counted: int | None, reason: str
) -> None:
    level = StockLevel("A", "s1", on_hand=5, reserved=1)
    with pytest.raises(ImpossibleAdjustment) as refused:
        apply_adjustment(level, kind, delta=delta, counted=counted)
    assert refused.value.reason == reason


# -- reservations: pickup ----------------------------------------------------------------------


def test_pickup_holds_everything_at_the_chosen_store() -> None:
    s1 = store("s1")
    levels = {"A": StockLevel("A", "s1", 3), "B": StockLevel("B", "s1", 1)}
    plan = plan_pickup([OrderLine("A", 2), OrderLine("B", 1)], s1, levels)
    assert plan.confirmed
    assert plan.holds == (Hold("A", "s1", 2), Hold("B", "s1", 1))


def test_pickup_is_all_or_nothing_and_names_every_shortfall() -> None:
    s1 = store("s1", safety=1)
    levels = {"A": StockLevel("A", "s1", 3), "B": StockLevel("B", "s1", 1)}
    lines = [
        OrderLine("A", 2, Decimal("10.00")),
        OrderLine("B", 1, Decimal("5.00")),
        OrderLine("C", 2, Decimal("7.50")),
    ]
    plan = plan_pickup(lines, s1, levels)
    assert not plan.confirmed and plan.holds == ()
    # Safety stock holds one B back; C was never stocked.
    assert [(s.sku, s.requested, s.available) for s in plan.shortfalls] == [
        ("B", 1, 0),
        ("C", 2, 0),
    ]
    assert plan.shortfalls[1].lost_revenue == Decimal("15.00")


def test_the_same_sku_on_two_lines_is_one_request() -> None:
    merged = merge_lines(
        [OrderLine("A", 1, Decimal("10")), OrderLine("B", 1), OrderLine("A", 3, Decimal("6"))]
    )
    assert [(line.sku, line.qty) for line in merged] == [("A", 4), ("B", 1)]
    assert merged[0].unit_price == Decimal("7")
    plan = plan_pickup(
        [OrderLine("A", 2), OrderLine("A", 2)], store("s1"), {"A": StockLevel("A", "s1", 3)}
    )
    assert [(s.sku, s.requested, s.available) for s in plan.shortfalls] == [("A", 4, 3)]


# -- reservations: delivery --------------------------------------------------------------------


LOCATIONS = {
    "s1": store("s1"),
    "s2": store("s2"),
    "s3": store("s3", ships=False),
    "w1": warehouse("w1", safety=2),
}


def test_delivery_prefers_one_location_for_the_whole_order_with_most_stock() -> None:
    levels = [
        StockLevel("A", "s1", 5),
        StockLevel("B", "s1", 5),
        StockLevel("A", "w1", 12),  # 10 sellable after safety stock
        StockLevel("B", "w1", 3),  # 1 sellable: cannot fill B
        StockLevel("A", "s2", 6),
        StockLevel("B", "s2", 6),
    ]
    plan = plan_delivery([OrderLine("A", 2), OrderLine("B", 2)], LOCATIONS, levels)
    assert plan.holds == (Hold("A", "s2", 2), Hold("B", "s2", 2))


def test_delivery_ties_break_by_location_id() -> None:
    levels = [StockLevel("A", "s2", 4), StockLevel("A", "s1", 4)]
    assert plan_delivery([OrderLine("A", 1)], LOCATIONS, levels).holds == (Hold("A", "s1", 1),)


def test_delivery_splits_when_no_single_location_can_fill_the_order() -> None:
    levels = [
        StockLevel("A", "s1", 3),
        StockLevel("A", "s2", 4),
        StockLevel("A", "w1", 4),  # 2 sellable
        StockLevel("A", "s3", 100),  # does not ship online
        StockLevel("B", "s1", 1),
    ]
    plan = plan_delivery([OrderLine("A", 8), OrderLine("B", 1)], LOCATIONS, levels)
    # B fits only at s1; A is split largest stock first (s2: 4, s1: 3, then w1: 1 of 2).
    assert plan.holds == (
        Hold("A", "s2", 4),
        Hold("A", "s1", 3),
        Hold("A", "w1", 1),
        Hold("B", "s1", 1),
    )


def test_delivery_takes_a_line_from_one_location_when_it_can() -> None:
    levels = [
        StockLevel("A", "s1", 2),
        StockLevel("A", "s2", 5),
        StockLevel("B", "s1", 1),
    ]
    plan = plan_delivery([OrderLine("A", 3), OrderLine("B", 1)], LOCATIONS, levels)
    assert plan.holds == (Hold("A", "s2", 3), Hold("B", "s1", 1))


def test_delivery_short_across_all_shipping_locations_is_rejected() -> None:
    levels = [StockLevel("A", "s1", 1), StockLevel("A", "w1", 3), StockLevel("A", "s3", 50)]
    plan = plan_delivery([OrderLine("A", 3, Decimal("20"))], LOCATIONS, levels)
    assert not plan.confirmed
    (short,) = plan.shortfalls
    assert (short.requested, short.available, short.missing) == (3, 2, 1)
    assert short.lost_revenue == Decimal("20")


def test_delivery_plan_is_deterministic_whatever_the_input_order() -> None:
    levels = [
        StockLevel("A", "s1", 3),
        StockLevel("A", "s2", 3),
        StockLevel("A", "w1", 5),
        StockLevel("B", "s2", 2),
    ]
    lines = [OrderLine("A", 7), OrderLine("B", 2)]
    first = plan_delivery(lines, LOCATIONS, levels)
    assert first == plan_delivery(lines, LOCATIONS, list(reversed(levels)))
    assert sum(h.qty for h in first.holds if h.sku == "A") == 7


# -- stock moves -------------------------------------------------------------------------------


def test_hold_release_fulfil_and_restock() -> None:
    level = StockLevel("A", "s1", on_hand=5)
    held = hold(level, 2)
    assert (held.on_hand, held.reserved, held.available) == (5, 2, 3)
    assert release(held, 2) == level
    assert fulfil(held, 2) == StockLevel("A", "s1", on_hand=3)
    assert restock(level, 4).on_hand == 9
    with pytest.raises(ValueError):
        hold(held, 4)


# -- what channels are told --------------------------------------------------------------------


def test_last_unit_sold_tells_out_of_stock_and_the_new_online_available() -> None:
    locations = {"s1": store("s1"), "w1": warehouse("w1")}
    before = {("A", "s1"): StockLevel("A", "s1", 1), ("A", "w1"): StockLevel("A", "w1", 4)}
    after = {**before, ("A", "s1"): StockLevel("A", "s1", 0)}
    told = {("A", "s1"): LOW, ("A", "w1"): LOW}
    (update,) = availability_updates(before, after, told, locations)
    assert update.level.location_id == "s1"
    assert (update.previous_status, update.status) == (LOW, OUT)
    assert update.sold_out
    assert update.online_available == 4


def test_a_new_row_starts_from_out_of_stock() -> None:
    after = {("A", "s1"): StockLevel("A", "s1", 20)}
    (update,) = availability_updates({}, after, {}, {"s1": store("s1")})
    assert (update.previous_status, update.status, update.online_available) == (OUT, IN, 20)
    assert not update.sold_out


def test_unchanged_rows_are_not_told() -> None:
    rows = {("A", "s1"): StockLevel("A", "s1", 5)}
    assert availability_updates(rows, dict(rows), {("A", "s1"): IN}, {"s1": store("s1")}) == []


def test_a_safety_stock_change_is_told_once_per_sku_where_it_changed() -> None:
    old = {"s1": store("s1"), "s2": store("s2")}
    new = {**old, "s1": store("s1", safety=3)}
    rows = {
        ("A", "s1"): StockLevel("A", "s1", 5),
        ("A", "s2"): StockLevel("A", "s2", 5),
        ("B", "s1"): StockLevel("B", "s1", 0),
    }
    told = {("A", "s1"): IN, ("A", "s2"): IN, ("B", "s1"): OUT}
    updates = availability_updates(rows, dict(rows), told, new, locations_before=old)
    # B was out of stock and stays so; A's online_available drops from 10 to 7.
    assert [(u.level.sku, u.level.location_id, u.online_available) for u in updates] == [
        ("A", "s1", 7)
    ]
