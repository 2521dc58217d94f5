"""A lot applied at once leaves what its events applied one by one would leave (pure parts)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from notification_service.adapters.sets import latest_availability, newest_snapshots
from notification_service.service.notify import order_trigger
from omni_contracts import (
    AvailabilityCause,
    AvailabilityChanged,
    AvailabilityStatus,
    OrderConfirmed,
    ProfileUpdated,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _snap(customer: str, version: int | None, email: str) -> ProfileUpdated:
    return ProfileUpdated(customer_id=customer, version=version, email=email)


def test_the_newest_snapshot_of_each_shopper_is_kept_and_an_older_one_never_wins() -> None:
    lot = [
        _snap("a", 2, "a2@x.test"),
        _snap("b", 1, "b1@x.test"),
        _snap("a", 1, "a1@x.test"),  # redelivered, older: applied alone it would not win
        _snap("a", 3, "a3@x.test"),
        _snap("b", 1, "b1bis@x.test"),  # the same version again wins, as one by one
    ]
    kept = {s.customer_id: s.email for s in newest_snapshots(lot)}
    assert kept == {"a": "a3@x.test", "b": "b1bis@x.test"}


def test_a_snapshot_without_a_version_replaces_like_it_would_alone() -> None:
    kept = newest_snapshots([_snap("a", 5, "old@x.test"), _snap("a", None, "new@x.test")])
    assert [s.email for s in kept] == ["new@x.test"]


def _avail(sku: str, loc: str, available: int, at: datetime) -> AvailabilityChanged:
    return AvailabilityChanged(
        sku=sku,
        location_id=loc,
        on_hand=available,
        reserved=0,
        available=available,
        status=AvailabilityStatus.IN_STOCK,
        previous_status=AvailabilityStatus.OUT_OF_STOCK,
        online_available=available,
        cause=AvailabilityCause.ADJUSTMENT,
        changed_at=at,
    )


def test_older_availability_news_never_wins_within_a_lot() -> None:
    lot = [
        _avail("S", "web", 3, T0 + timedelta(seconds=2)),
        _avail("S", "web", 9, T0),  # late news
        _avail("S", "store-1", 1, T0),
    ]
    kept = {(c.sku, c.location_id): c.available for c in latest_availability(lot)}
    assert kept == {("S", "web"): 3, ("S", "store-1"): 1}


def test_an_order_confirmation_tells_its_shopper_once_per_order() -> None:
    event = OrderConfirmed(order_id="o-1", customer_id="c-1", channel="web")
    trigger = order_trigger(event)
    assert trigger is not None
    assert (trigger.customer_id, trigger.kind) == ("c-1", "order_confirmed")
    assert trigger.dedup_key == f"order:o-1:{event.ce_type}"
    anonymous = OrderConfirmed(order_id="o-2", customer_id=None, channel="store")
    assert order_trigger(anonymous) is None
