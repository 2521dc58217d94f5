"""Which fetched events may join a lot: ``Subscription.together`` as a flag or per event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from omni_common.kafka import KafkaRuntime, Subscription
from omni_common.metrics import PlatformMetrics
from omni_common.settings import ServiceSettings
from omni_contracts.common import INVENTORY_ADJUSTMENTS
from omni_contracts.envelope import encode, new_envelope
from omni_contracts.inbound import StockAdjusted
from opentelemetry.context import Context


def _record(event: StockAdjusted) -> ConsumerRecord[Any, Any]:
    headers = new_envelope(event, source="unit").headers()
    return ConsumerRecord(
        topic=INVENTORY_ADJUSTMENTS,
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=event.sku.encode(),
        value=encode(event),
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=[(k, v.encode()) for k, v in headers.items()],
    )


def _adjustment(kind: str) -> StockAdjusted:
    return StockAdjusted(
        adjustment_id=f"adj-{kind}",
        location_id="store-1",
        sku="SKU-1",
        kind=kind,
        delta=None if kind == "count" else 3,
        counted=5 if kind == "count" else None,
        occurred_at=datetime.now(UTC),
    )


async def _ignore(event: Any, envelope: Any) -> None:
    return None


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
    kafka = KafkaRuntime(ServiceSettings(service_name="unit"), PlatformMetrics("unit"))
    kafka.subscribe(
        Subscription(INVENTORY_ADJUSTMENTS, {StockAdjusted: _ignore}, together=together)
    )
    _, handlers = kafka._routes["main"][INVENTORY_ADJUSTMENTS]
    for kind, expected in joins.items():
        parsed = kafka.parse(_record(_adjustment(kind)), INVENTORY_ADJUSTMENTS, handlers, Context())
        assert parsed is not None
        assert parsed.together is expected, kind
