"""The loyalty rules, pure: earning, refusals, reversals, give-backs, tiers, offers."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from loyalty_service.domain.model import (
    EarnedLine,
    EarnRules,
    give_back,
    pairs,
    pick_offer,
    points_for_units,
    refusal,
    reversal,
    review,
    upgrade,
)
from loyalty_service.settings import LoyaltySettings, parse_tiers
from omni_contracts import RefusalReason

RULES = EarnRules(
    points_per_unit=Decimal(1),
    point_value=Decimal("0.01"),
    tiers=parse_tiers("base=0:1,silver=500:1.25,gold=1500:1.5"),
)


def test_points_are_earned_per_sku_rounded_down_with_the_tier_multiplier() -> None:
    lines = [("A", 2, Decimal("9.99")), ("B", 1, Decimal("0.50")), ("A", 1, Decimal("9.99"))]
    earned = {line.sku: line for line in RULES.earn(lines, "base")}
    assert earned["A"] == EarnedLine("A", 3, Decimal("29.97"), 29)
    assert earned["B"].points == 0
    assert {line.sku: line.points for line in RULES.earn(lines, "gold")} == {"A": 44, "B": 0}
    assert RULES.earn(lines, "no-such-tier")[0].points == 29  # unknown: the lowest tier
    half_up = EarnRules(RULES.points_per_unit, RULES.point_value, RULES.tiers, "half_up")
    assert {line.sku: line.points for line in half_up.earn(lines, "base")} == {"A": 30, "B": 1}


def test_a_point_is_worth_its_value_rounded_down_to_the_cent() -> None:
    assert RULES.value_of(1000) == Decimal("10.00")
    assert RULES.value_of(1) == Decimal("0.01")
    half = EarnRules(Decimal(1), Decimal("0.005"), RULES.tiers)
    assert half.value_of(3) == Decimal("0.01")


def test_a_hold_is_refused_for_an_unknown_member_or_too_few_points() -> None:
    assert refusal(False, 0, 10) is RefusalReason.UNKNOWN_MEMBER
    assert refusal(True, 9, 10) is RefusalReason.INSUFFICIENT_POINTS
    assert refusal(True, 10, 10) is None


def test_returning_every_unit_in_any_order_reverses_exactly_what_was_earned() -> None:
    rng = random.Random(12)
    for _ in range(300):
        qty = rng.randint(1, 7)
        points = rng.randint(0, 999)
        line = EarnedLine("A", qty, Decimal(1), points)
        returned: dict[str, int] = {}
        total = 0
        while returned.get("A", 0) < qty:
            now = rng.randint(1, qty)  # may ask for more than is left: clamped
            got, returned = reversal([line], returned, {"A": now})
            assert got >= 0
            total += got
        assert total == points
        # Nothing more comes back once all was returned.
        assert reversal([line], returned, {"A": 1})[0] == 0


def test_a_partial_return_reverses_the_returned_lines_only() -> None:
    lines = [EarnedLine("SHIRT", 2, Decimal(40), 400), EarnedLine("SOCKS", 1, Decimal(5), 50)]
    got, after = reversal(lines, {}, {"SHIRT": 1, "UNKNOWN": 3})
    assert got == 200 and after == {"SHIRT": 1}
    assert points_for_units(400, 2, 5) == 400  # clamped to what was bought


def test_redeemed_points_come_back_in_proportion_and_never_beyond_what_was_redeemed() -> None:
    assert give_back(1000, Decimal(20), Decimal(0), Decimal(10)) == 500
    rng = random.Random(3)
    for _ in range(300):
        redeemed = rng.randint(1, 5000)
        values = [Decimal(rng.randint(1, 5000)) / 100 for _ in range(rng.randint(1, 5))]
        gross = sum(values)
        before, total = Decimal(0), 0
        for value in values:
            total += give_back(redeemed, gross, before, value)
            before += value
        assert total == redeemed
        # A return claiming more than the order's value gives back nothing more.
        assert give_back(redeemed, gross, gross, Decimal(10)) == 0


def test_tiers_go_up_at_once_and_only_the_review_brings_them_down() -> None:
    assert upgrade(RULES, "base", Decimal(499)) is None
    assert upgrade(RULES, "base", Decimal(500)).name == "silver"
    assert upgrade(RULES, "gold", Decimal(0)) is None  # a return never downgrades
    assert review(RULES, "gold", Decimal(600)).name == "silver"
    assert review(RULES, "silver", Decimal(600)) is None
    assert review(RULES, "silver", Decimal(2000)).name == "gold"


def test_the_offer_is_the_most_bought_together_item_not_owned_and_in_stock() -> None:
    together = [("LAMP", 3), ("PEGS", 1), ("MAT", 1)]
    assert pick_offer(together, bought=[], in_stock=["PEGS", "MAT"]) == "PEGS"
    assert pick_offer(together, bought=["PEGS"], in_stock=["PEGS", "MAT"]) == "MAT"
    assert pick_offer(together, bought=[], in_stock=[]) is None
    assert sorted(pairs(["A", "B", "A"])) == [("A", "B"), ("B", "A")]
    assert len(pairs([str(i) for i in range(100)])) == 20 * 19  # big baskets are bounded


def test_settings_parse_the_tiers_and_refuse_malformed_ones() -> None:
    settings = LoyaltySettings(loyalty_tiers="base=0:1,vip=100:2")
    assert [t.name for t in settings.tiers] == ["base", "vip"]
    assert settings.rules.tier("vip").multiplier == 2
    for bad in ("silver=500:1.25", "base=0:1,gold=100:2,silver=50:1", "base"):
        with pytest.raises(ValueError):
            LoyaltySettings(loyalty_tiers=bad)
