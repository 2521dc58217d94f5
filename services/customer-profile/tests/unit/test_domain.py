"""The customer-profile domain: identifier guards, merge decisions, cart verdicts (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from customer_profile_service.domain import (
    DEFAULT_LIMITS,
    CartLimits,
    CartLine,
    CartSkip,
    IdKind,
    ProfileError,
    Skip,
    cart_value,
    check_cart,
    contents_hash,
    covered_by,
    decide_claim,
    is_blocked,
    judge_abandonment,
    normalise,
    parse_limits,
    survivor,
    validate_contact,
)
from customer_profile_service.settings import ProfileSettings

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


PLACEHOLDERS = ["", "  ", "anonymous", "ANONYMOUS", "-1", "0", "0000", "000-000"]


@pytest.mark.parametrize("value", PLACEHOLDERS)
def test_placeholders_are_blocked(value: str) -> None:
    assert is_blocked(value)


@pytest.mark.parametrize("value", ["card-1", "100", "a@b.io", "+33612345678"])
def test_real_values_are_not_blocked(value: str) -> None:
    assert not is_blocked(value)


def test_contacts_are_normalised_and_validated() -> None:
    assert normalise(IdKind.EMAIL, "  Ann@Example.COM ") == "ann@example.com"
    assert validate_contact(IdKind.PHONE, "+33 (6) 12-34.56 78") == "+33612345678"
    with pytest.raises(ProfileError) as exc:
        validate_contact(IdKind.EMAIL, "not-mail")
    assert exc.value.reason == "invalid_contact"
    with pytest.raises(ProfileError):
        validate_contact(IdKind.PHONE, "12")


def _claim(kind: IdKind, owner: str | None, counts=None, other=None, limits=DEFAULT_LIMITS):
    return decide_claim(kind, "v-1", "c-2", owner, counts or {}, other, limits)


def test_a_free_identifier_is_added_within_the_limit() -> None:
    assert _claim(IdKind.EMAIL, None).action == "add"
    full = _claim(IdKind.EMAIL, None, counts={IdKind.EMAIL: 1})
    assert (full.action, full.skip) == ("skip", Skip.IDENTIFIER_LIMIT)
    assert _claim(IdKind.EMAIL, "c-2").action == "known"


def test_a_shared_device_never_merges() -> None:
    decision = _claim(IdKind.ANONYMOUS_ID, "c-1")
    assert (decision.action, decision.skip, decision.other) == ("skip", Skip.SHARED_DEVICE, "c-1")


def test_a_shared_card_merges_unless_the_merge_breaks_a_limit() -> None:
    assert _claim(IdKind.LOYALTY_CARD, "c-1").action == "merge"
    both_have_email = _claim(
        IdKind.LOYALTY_CARD, "c-1", counts={IdKind.EMAIL: 1}, other={IdKind.EMAIL: 1}
    )
    assert (both_have_email.action, both_have_email.skip) == ("skip", Skip.IDENTIFIER_LIMIT)
    relaxed = parse_limits("email=2")
    assert (
        _claim(
            IdKind.LOYALTY_CARD,
            "c-1",
            counts={IdKind.EMAIL: 1},
            other={IdKind.EMAIL: 1},
            limits=relaxed,
        ).action
        == "merge"
    )


def test_a_blocked_value_is_skipped_before_anything_else() -> None:
    decision = decide_claim(IdKind.LOYALTY_CARD, "-1", "c-2", "c-1", {}, {}, DEFAULT_LIMITS)
    assert (decision.action, decision.skip) == ("skip", Skip.BLOCKED_VALUE)


def test_the_older_profile_survives() -> None:
    assert survivor(("b", T0), ("a", T0 + timedelta(days=1))) == ("b", "a")
    assert survivor(("b", T0), ("a", T0)) == ("a", "b")


def test_limits_parse_over_the_defaults() -> None:
    limits = parse_limits(" email=3 , anonymous_id=10")
    assert limits[IdKind.EMAIL] == 3 and limits[IdKind.ANONYMOUS_ID] == 10
    assert limits[IdKind.PHONE] == DEFAULT_LIMITS[IdKind.PHONE]
    with pytest.raises(ValueError):
        parse_limits("email")


def _line(sku: str, qty: int = 1, price: str = "2.50") -> CartLine:
    return CartLine(sku, qty, Decimal(price), "EUR")


def test_contents_hash_ignores_order_but_not_quantities() -> None:
    a, b = _line("A"), _line("B")
    assert contents_hash([a, b]) == contents_hash([b, a])
    assert contents_hash([a]) != contents_hash([_line("A", 2)])
    assert cart_value([_line("A", 2), _line("B", 1, "1.00")]) == Decimal("6.00")


def test_huge_carts_are_refused() -> None:
    limits = CartLimits(max_lines=2, max_qty=5)
    check_cart([_line("A"), _line("B")], limits)
    with pytest.raises(ProfileError, match="3 lines"):
        check_cart([_line("A"), _line("B"), _line("C")], limits)
    with pytest.raises(ProfileError) as exc:
        check_cart([_line("A", 6)], limits)
    assert exc.value.reason == "cart_too_large"


def test_every_cart_sku_must_be_bought_to_cancel() -> None:
    assert covered_by(["A", "B"], {"A", "B", "C"})
    assert not covered_by(["A", "B"], {"A"})
    assert not covered_by([], {"A"})


def _judge(**facts: object) -> tuple[bool, CartSkip | None]:
    base: dict[str, object] = {
        "status": "open",
        "owner": "c-1",
        "erased": False,
        "hash_now": "h1",
        "announced_hash": None,
        "bought_after_activity": False,
    }
    verdict = judge_abandonment(**(base | facts))  # type: ignore[arg-type]
    return verdict.announce, verdict.skip


def test_abandonment_verdicts() -> None:
    assert _judge() == (True, None)
    assert _judge(status="checked_out") == (False, CartSkip.CHECKED_OUT)
    assert _judge(status="emptied") == (False, CartSkip.EMPTIED)
    assert _judge(bought_after_activity=True) == (False, CartSkip.PURCHASED)
    assert _judge(owner=None) == (False, CartSkip.ANONYMOUS)
    assert _judge(erased=True) == (False, CartSkip.ERASED)
    assert _judge(announced_hash="h1") == (False, CartSkip.ALREADY_ANNOUNCED)
    assert _judge(status="abandoned", announced_hash="h0") == (True, None)


@pytest.mark.parametrize(
    ("raw", "seconds"), [("3600", 3600), ("2.5", 2.5), ("PT1H", 3600), ("PT0.5S", 0.5)]
)
def test_the_abandonment_delay_reads_seconds_or_iso_8601(
    raw: str, seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CART_ABANDONMENT_DELAY", raw)
    assert ProfileSettings().cart_abandonment_delay == timedelta(seconds=seconds)


def test_the_default_delay_is_an_hour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CART_ABANDONMENT_DELAY", raising=False)
    assert ProfileSettings().cart_abandonment_delay == timedelta(hours=1)
