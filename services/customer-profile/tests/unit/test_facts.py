"""Facts: a shopper's signals converge whatever their order; merges keep the strictest
consent; unmerges give back what was each side's; devices and snapshots stay bounded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from customer_profile_service.domain import facts as F
from customer_profile_service.domain.snapshots import (
    SNAPSHOT_BUDGET_BYTES,
    bound_snapshot,
    encoded_size,
)
from hypothesis import given, settings
from hypothesis import strategies as st

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def sub(n: int, **extra: Any) -> dict[str, Any]:
    return {"endpoint": f"https://push.example/{n}", "keys": {"p256dh": "k", "auth": "a"}, **extra}


SIGNALS: list[tuple[str, Any]] = [
    ("contact", F.ContactChange(email="a@x.io")),
    ("contact", F.ContactChange(email="b@x.io", email_verified=True)),
    ("contact", F.ContactChange(phone="+33612345678")),
    ("contact", F.ContactChange(push_subscription=sub(1))),
    ("contact", F.ContactChange(push_subscription=sub(2))),
    ("contact", F.ContactChange(gone_endpoints=("https://push.example/1",))),
    ("contact", F.ContactChange(push_token="tok-1")),
    ("contact", F.ContactChange(cleared=frozenset({"phone"}))),
    ("prefs", {"consents": {"email": True}, "language": "fr"}),
    ("prefs", {"consents": {"email": False}}),
    ("prefs", {"quiet_hours_start": "22:00:00", "quiet_hours_end": "07:00:00"}),
    ("prefs", {"time_zone": "Europe/Paris", "preferred_channel": "push"}),
]


def replay(order: list[int], max_devices: int = 10) -> F.Derived:
    facts = F.empty()
    for i in order:
        kind, what = SIGNALS[i]
        at = F.stamp(T0 + timedelta(minutes=i), f"ce-{i}")
        if kind == "contact":
            F.apply_contact(facts, "c1", what, at)
        else:
            F.apply_preferences(facts, "c1", what, at)
        F.prune(facts, max_devices)
    return F.derive(facts, "c1", max_devices)


@settings(max_examples=200, deadline=None)
@given(st.permutations(range(len(SIGNALS))), st.integers(min_value=1, max_value=3))
def test_a_shoppers_signals_converge_in_any_order(order: list[int], devices: int) -> None:
    expected = replay(list(range(len(SIGNALS))), devices)
    got = replay(order, devices)
    got.dropped_devices = expected.dropped_devices = []
    assert got == expected
    assert got.email == "b@x.io" and got.phone is None
    assert got.preferences["consents"] == {"email": False}
    endpoints = [s["endpoint"] for s in got.push_subscriptions]
    assert "https://push.example/1" not in endpoints  # found gone, whenever that was said


def test_a_merge_keeps_the_most_restrictive_consent_until_the_shopper_answers_again() -> None:
    a, b = F.empty(), F.empty()
    F.apply_preferences(a, "a", {"consents": {"email": True, "push": True}}, F.stamp(T0, "1"))
    later = T0 + timedelta(hours=1)
    F.apply_preferences(b, "b", {"consents": {"email": False}}, F.stamp(T0 - timedelta(days=1)))
    merged = F.merge(a, b, "b", later)
    assert F.derive(merged, "a", 10).preferences["consents"] == {"email": False, "push": True}
    # A newer yes from before the merge is another shopper's: the no stands.
    F.apply_preferences(
        merged, "a", {"consents": {"email": True}}, F.stamp(T0 + timedelta(minutes=5))
    )
    assert F.derive(merged, "a", 10).preferences["consents"]["email"] is False
    # A yes given after the merge is the merged shopper's own newer answer.
    F.apply_preferences(
        merged, "a", {"consents": {"email": True}}, F.stamp(later + timedelta(minutes=1))
    )
    assert F.derive(merged, "a", 10).preferences["consents"]["email"] is True


def test_an_unmerge_gives_each_side_its_own_facts() -> None:
    a, b = F.empty(), F.empty()
    F.apply_contact(a, "a", F.ContactChange(email="a@x.io", email_verified=True), F.stamp(T0))
    F.apply_contact(b, "b", F.ContactChange(email="b@x.io", push_subscription=sub(9)), F.stamp(T0))
    merged = F.merge(a, b, "b", T0 + timedelta(hours=1))
    kept, restored = F.split(merged, "b")
    assert F.derive(kept, "a", 10).email == "a@x.io"
    assert F.derive(kept, "a", 10).push_subscriptions == []
    back = F.derive(restored, "b", 10)
    assert back.email == "b@x.io" and back.push_subscriptions == [sub(9)]
    assert F.verified_contacts(restored, "b") == {}


def test_devices_are_bounded_oldest_dropped_and_unknown_keys_dropped() -> None:
    facts = F.empty()
    for n in range(5):
        change = F.ContactChange(push_subscription=sub(n, spy="x"))
        F.apply_contact(facts, "c", change, F.stamp(T0 + timedelta(minutes=n)))
    dropped = F.prune(facts, 3)
    assert sorted(dropped) == ["https://push.example/0", "https://push.example/1"]
    derived = F.derive(facts, "c", 3)
    assert [s["endpoint"][-1] for s in derived.push_subscriptions] == ["2", "3", "4"]
    assert all("spy" not in s for s in derived.push_subscriptions)
    # A late registration older than the kept ones does not come back.
    F.apply_contact(facts, "c", F.ContactChange(push_subscription=sub(0)), F.stamp(T0))
    F.prune(facts, 3)
    assert len(F.derive(facts, "c", 3).push_subscriptions) == 3


def test_a_snapshot_never_exceeds_the_budget() -> None:
    huge = {
        "customer_id": "c",
        "email": "e@x.io",
        "anonymous_ids": ["d" * 200] * 5000,
        "push_subscriptions": [sub(n) | {"endpoint": "https://" + "p" * 2000} for n in range(500)],
        "emails": ["e@x.io"],
    }
    assert encoded_size(huge) > SNAPSHOT_BUDGET_BYTES
    bounded = bound_snapshot(huge)
    assert encoded_size(bounded) <= SNAPSHOT_BUDGET_BYTES
    assert bounded["email"] == "e@x.io"


@settings(max_examples=50, deadline=None)
@given(st.permutations(range(4)))
def test_a_device_found_gone_stays_gone_whatever_the_clocks_and_the_order(
    order: list[int],
) -> None:
    # The channel's clock runs ahead of notification's: the registration of device 2 is
    # stamped after the push service's verdict on it, and a channel re-sends it later still.
    signals = [
        (F.ContactChange(push_subscription=sub(1)), T0),
        (F.ContactChange(push_subscription=sub(2)), T0 + timedelta(minutes=2)),
        (F.ContactChange(gone_endpoints=("https://push.example/2",)), T0 + timedelta(minutes=1)),
        (F.ContactChange(push_subscription=sub(2)), T0 + timedelta(minutes=3)),
    ]
    facts = F.empty()
    for i in order:
        change, at = signals[i]
        F.apply_contact(facts, "c1", change, F.stamp(at, f"ce-{i}"))
        assert "https://push.example/2" not in F.prune(facts, 10)  # gone, not "dropped"
    derived = F.derive(facts, "c1", 10)
    assert [s["endpoint"] for s in derived.push_subscriptions] == ["https://push.example/1"]


def test_a_device_found_gone_on_one_side_of_a_merge_is_gone_on_the_survivor() -> None:
    a, b = F.empty(), F.empty()
    F.apply_contact(a, "a", F.ContactChange(push_subscription=sub(1)), F.stamp(T0, "1"))
    gone = F.ContactChange(gone_endpoints=("https://push.example/1",))
    F.apply_contact(b, "b", gone, F.stamp(T0 - timedelta(hours=1), "2"))
    merged = F.merge(a, b, "b", T0 + timedelta(hours=1))
    assert F.derive(merged, "a", 10).push_subscriptions == []
