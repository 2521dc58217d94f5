"""How a fetched record is looked at: once, its ``ce_type`` first, with the reason it is
invalid; which events join a lot; how a lot's events become handler calls."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from omni_common.dispatch import Invalid, Skip, Valid, runs_of
from omni_common.handlers import Lot, Subscription, only_when
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_contracts.common import INVENTORY_ADJUSTMENTS, ORDER_LIFECYCLE
from omni_contracts.envelope import encode, new_envelope
from omni_contracts.inbound import StockAdjusted

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _record(
    value: bytes | None, headers: dict[str, str], topic: str = INVENTORY_ADJUSTMENTS
) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=[(k, v.encode()) for k, v in headers.items()],
    )


def _adjustment(kind: str = "receipt") -> StockAdjusted:
    return StockAdjusted(
        adjustment_id=f"adj-{kind}",
        location_id="store-1",
        sku="SKU-1",
        kind=kind,
        delta=None if kind == "count" else 3,
        counted=5 if kind == "count" else None,
        occurred_at=NOW,
    )


def _event_record(event: StockAdjusted) -> ConsumerRecord[Any, Any]:
    return _record(encode(event), new_envelope(event, source="unit").headers())


async def _ignore(events: Lot[Any]) -> None:
    return None


def _runtime(*subscriptions: Subscription) -> ServiceRuntime:
    runtime = ServiceRuntime(ServiceSettings(service_name="unit"))
    runtime.subscribe(*subscriptions)
    return runtime


def _classify(runtime: ServiceRuntime, record: ConsumerRecord[Any, Any]) -> Any:
    route = runtime.kafka._routes[record.topic]
    return runtime.dispatcher.classify(record, route).verdict


@pytest.mark.parametrize(
    ("together", "joins"),
    [
        (True, {"receipt": True, "count": True}),
        (False, {"receipt": False, "count": False}),
        (lambda event: event.kind != "count", {"receipt": True, "count": False}),
    ],
    ids=["all", "none", "per-event"],
)
def test_together_says_which_events_join_a_lot(together: Any, joins: dict[str, bool]) -> None:
    runtime = _runtime(
        Subscription(INVENTORY_ADJUSTMENTS, {StockAdjusted: _ignore}, together=together)
    )
    for kind, expected in joins.items():
        verdict = _classify(runtime, _event_record(_adjustment(kind)))
        assert isinstance(verdict, Valid)
        assert verdict.joins_lot is expected, kind


def test_an_event_no_handler_wants_is_skipped_by_its_type_without_decoding() -> None:
    runtime = _runtime(Subscription(ORDER_LIFECYCLE, {}))
    # Not even JSON: had it been decoded it would be a dead letter.
    record = _record(b"\xff not json", {"ce_type": "order.placed"}, topic=ORDER_LIFECYCLE)
    assert _classify(runtime, record) == Skip("order.placed", "ignored")


def test_a_type_the_topic_does_not_carry_is_a_dead_letter() -> None:
    runtime = _runtime(Subscription(INVENTORY_ADJUSTMENTS, {StockAdjusted: _ignore}))
    headers = new_envelope(_adjustment(), source="unit").headers() | {"ce_type": "no.such"}
    verdict = _classify(runtime, _record(b"{}", headers))
    assert isinstance(verdict, Invalid) and verdict.reason == "unknown_event_type"


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"{not json", None, "malformed_json"),
        (b'{"sku": "SKU-1"}', None, "schema_violation"),
        (b"{}", {"ce_id": "not-a-uuid"}, "invalid_envelope"),
        (b"{}", {"ce_time": "yesterday"}, "invalid_envelope"),
    ],
)
def test_an_invalid_record_says_why_once(
    value: bytes, headers: dict[str, str] | None, reason: str
) -> None:
    runtime = _runtime(Subscription(INVENTORY_ADJUSTMENTS, {StockAdjusted: _ignore}))
    envelope = new_envelope(_adjustment(), source="unit").headers() | (headers or {})
    verdict = _classify(runtime, _record(value, envelope))
    assert isinstance(verdict, Invalid)
    assert verdict.reason == reason
    assert verdict.error  # what the DLQ entry says, from this one parse


def test_only_when_drops_irrelevant_events_before_any_transaction() -> None:
    runtime = _runtime(
        Subscription(
            INVENTORY_ADJUSTMENTS,
            {StockAdjusted: only_when(lambda e: e.kind == "receipt", _ignore)},
        )
    )
    assert isinstance(_classify(runtime, _event_record(_adjustment("receipt"))), Valid)
    skipped = _classify(runtime, _event_record(_adjustment("count")))
    assert skipped == Skip("inventory.stock.adjusted", "not_relevant")


def test_a_tombstone_is_skipped() -> None:
    runtime = _runtime(Subscription(INVENTORY_ADJUSTMENTS, {StockAdjusted: _ignore}))
    assert _classify(runtime, _record(None, {})) == Skip("tombstone", "ignored")


def test_a_lot_calls_each_handler_once_per_stretch_keeping_each_partition_in_order() -> None:
    runtime = _runtime(Subscription(INVENTORY_ADJUSTMENTS, {StockAdjusted: _ignore}))
    handling = next(iter(runtime.kafka._routes.values())).handlings["inventory.stock.adjusted"]
    other = type(handling)(handling.model, _ignore, "other")  # type: ignore[arg-type]

    def valid(name: str, h: Any) -> Valid:
        event = _adjustment()
        return Valid(event, new_envelope(event, source=name), h, True, None)  # type: ignore[arg-type]

    # Partition 0: A A B ; partition 1: A B ; partition 2: B
    sources = [
        [valid("p0a", handling), valid("p0b", handling), valid("p0c", other)],
        [valid("p1a", handling), valid("p1b", other)],
        [valid("p2a", other)],
    ]
    calls = runs_of(sources)
    assert [(h.name, [r.envelope.source for r in items]) for h, items in calls] == [
        (handling.name, ["p0a", "p0b", "p1a"]),
        ("other", ["p0c", "p1b", "p2a"]),
    ]


def test_a_handler_asking_for_what_nobody_provides_stops_the_composition() -> None:
    async def needs_stock(events: Lot[Any], stockroom: object) -> None:
        return None

    with pytest.raises(TypeError, match="stockroom"):
        _runtime(Subscription(INVENTORY_ADJUSTMENTS, {StockAdjusted: needs_stock}))
