"""The stream's feed: rings per SKU, resume positions, bounded fan-out (no I/O)."""

from __future__ import annotations

import json

import pytest
from inventory_service.adapters.availability_feed import (
    AvailabilityFeed,
    BadEventId,
    Change,
    Filter,
    StreamMetrics,
    decode_position,
    encode_position,
)
from prometheus_client import CollectorRegistry


def _feed(**kwargs: int) -> tuple[AvailabilityFeed, CollectorRegistry]:
    registry = CollectorRegistry()
    return AvailabilityFeed(StreamMetrics("inventory", registry), **kwargs), registry


def _change(offset: int, sku: str = "SKU-1", location: str = "s1", partition: int = 0) -> Change:
    data = json.dumps({"sku": sku, "location_id": location, "available": offset})
    return Change(partition, offset, sku, location, data, 0)


def test_positions_round_trip_and_foreign_ids_are_refused() -> None:
    assert decode_position(encode_position({3: 17, 0: 5})) == {0: 5, 3: 17}
    assert decode_position("") == {}
    for bad in ("abc", "1:2:3", "1-2", "0:-5"):
        with pytest.raises(BadEventId):
            decode_position(bad)


def test_backlog_is_what_came_after_the_position_for_the_filter() -> None:
    feed, _ = _feed()
    for offset, sku, location in [(1, "A", "s1"), (2, "B", "s1"), (3, "A", "s2"), (4, "A", "s1")]:
        feed.add(_change(offset, sku, location))
    backlog, gap = feed.backlog(Filter(frozenset({"A"})), {0: 1})
    assert [c.offset for c in backlog] == [3, 4] and not gap
    backlog, _ = feed.backlog(Filter(frozenset({"A"}), frozenset({"s1"})), {0: 0})
    assert [c.offset for c in backlog] == [1, 4]
    backlog, _ = feed.backlog(Filter(), {0: 2})
    assert [c.offset for c in backlog] == [3, 4]


def test_a_ring_that_no_longer_reaches_back_says_so() -> None:
    feed, _ = _feed(ring_size=2)
    for offset in range(1, 6):
        feed.add(_change(offset))
    backlog, gap = feed.backlog(Filter(frozenset({"SKU-1"})), {0: 1})
    assert gap
    backlog, gap = feed.backlog(Filter(frozenset({"SKU-1"})), {0: 3})
    assert [c.offset for c in backlog] == [4, 5] and not gap


def test_an_evicted_sku_makes_older_positions_a_gap() -> None:
    feed, _ = _feed(max_skus=2)
    feed.add(_change(1, "A"))
    feed.add(_change(2, "B"))
    feed.add(_change(3, "C"))  # A leaves the feed
    assert feed.backlog(Filter(), {0: 0})[1]
    assert not feed.backlog(Filter(), {0: 1})[1]


def test_a_slow_client_is_dropped_and_counted_the_others_get_everything() -> None:
    feed, registry = _feed(queue_size=2)
    slow = feed.open(Filter())
    fast = feed.open(Filter())
    assert slow is not None and fast is not None
    for offset in range(1, 4):
        feed.add(_change(offset))
        fast.queue.get_nowait()  # the fast client keeps up
    assert slow.dropped
    # Its writer wakes to an end marker; the fast one was never held up.
    items = []
    while not slow.queue.empty():
        items.append(slow.queue.get_nowait())
    assert items[-1] is None
    assert (
        registry.get_sample_value(
            "omni_inventory_stream_dropped_clients_total",
            {"service": "inventory", "reason": "slow"},
        )
        == 1
    )
    feed.add(_change(4))
    assert fast.queue.get_nowait().offset == 4
    assert slow.queue.empty()  # a dropped client gets nothing more
    feed.close(slow)
    feed.close(fast)
    assert registry.get_sample_value("omni_inventory_stream_clients", {"service": "inventory"}) == 0


def test_the_feed_refuses_clients_past_its_cap() -> None:
    feed, _ = _feed(max_clients=1)
    assert feed.open(Filter()) is not None
    assert feed.open(Filter()) is None
