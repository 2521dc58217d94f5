"""The database refuses connections for 10 s while store sales arrive: nothing is lost.

Before the fix, 54 of 100 valid sales went to the DLQ (``handler_failed ... not currently
accepting connections``). Infrastructure errors are now retried until the database answers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from inventory_service.entrypoints.app import create_app
from inventory_service.settings import InventorySettings
from omni_contracts import Line, Money, SaleRecorded, StockAdjusted
from omni_devkit.testing.chaos import Figures, database_refusing, wait_for
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.services import running

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
SKUS = [f"SKU-{i}" for i in range(8)]
STOCK = 1_000
SALES = 100
OUTAGE_S = 10.0


def sale(sku: str) -> SaleRecorded:
    return SaleRecorded(
        sale_id=f"sale-{uuid.uuid4().hex[:8]}",
        location_id="store-1",
        lines=[Line(sku=sku, qty=1, unit_price=Money(amount=Decimal("9.90"), currency="EUR"))],
        occurred_at=NOW,
    )


def receipt(sku: str, qty: int) -> StockAdjusted:
    return StockAdjusted(
        adjustment_id=f"adj-{uuid.uuid4().hex[:8]}",
        location_id="store-1",
        sku=sku,
        kind="receipt",
        delta=qty,
        occurred_at=NOW,
    )


LOCATION = {
    "name": "Store 1",
    "kind": "store",
    "ships_online": True,
    "offers_pickup": True,
    "safety_stock": 0,
    "low_stock_threshold": 2,
}


async def test_database_refusing_connections_for_10s_loses_and_dead_letters_nothing(
    omni_env,
) -> None:
    figures = Figures("database refusing connections 10s")
    settings = InventorySettings.from_settings(
        omni_env.settings("inventory"), inventory_timer_poll_s=0.1
    )
    dlq = omni_env.reader("store.sales.v1.dlq")
    out = omni_env.reader("inventory.availability.v1")
    async with (
        running(create_app(settings)) as inventory,
        ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel,
        dlq,
        out,
    ):
        pool = inventory.runtime.pool
        assert (await inventory.http.put("/locations/store-1", json=LOCATION)).status_code == 201
        for sku in SKUS:
            await channel.publish(receipt(sku, STOCK))

        async def on_hand() -> int:
            return int(await pool.fetchval("SELECT coalesce(sum(on_hand), 0) FROM stock"))

        async def stocked() -> bool:
            return await on_hand() == STOCK * len(SKUS)

        await wait_for(stocked, timeout=30)

        sale_ids: set[str] = set()
        async with database_refusing(omni_env.server_url, omni_env.database):
            started = time.monotonic()
            for i in range(SALES):
                sent = await channel.publish(sale(SKUS[i % len(SKUS)]))
                sale_ids.add(sent.id)
            figures.sent = SALES
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))

        async def all_applied() -> bool:
            return await on_hand() == STOCK * len(SKUS) - SALES

        figures.recovered_s = await wait_for(all_applied, timeout=45)
        figures.applied = STOCK * len(SKUS) - await on_hand()

        # What channels saw: one availability change per sale, none twice.
        seen: Counter[str] = Counter()
        told: set[str] = set()
        while len({c for c in seen if c in sale_ids}) < SALES:
            batch = await out.collect(SALES * 2, timeout=10)
            assert batch, f"only {len(seen)} sales told on {out.topic}"
            for record in batch:
                headers = record_headers(record)
                if headers["ce_id"] not in told:
                    told.add(headers["ce_id"])
                    seen[headers.get("causation_id", "")] += 1
        figures.duplicates = sum(n - 1 for c, n in seen.items() if c in sale_ids and n > 1)
        dead = await dlq.collect(SALES, timeout=2)
        figures.dead_lettered = len(dead)
        figures.report()
        reasons = Counter(record_headers(r).get("dlq_error", "")[:80] for r in dead)
        assert figures.dead_lettered == 0, reasons
        assert figures.applied == SALES
        assert figures.duplicates == 0
        assert all(json.loads(r.value) for r in dead) or not dead
