"""Fixtures for inventory service tests against the real broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from inventory_service.entrypoints.app import create_app
from inventory_service.settings import InventorySettings
from omni_contracts import (
    Channel,
    Fulfillment,
    Line,
    Money,
    OrderPlaced,
    SaleRecorded,
    StockAdjusted,
)
from omni_devkit.testing.events import ChannelPublisher
from omni_devkit.testing.services import RunningService, running

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


class Events:
    """Builders of the events and bodies these tests send (the ``ev`` fixture)."""

    NOW = NOW

    @staticmethod
    def uid(prefix: str) -> str:
        """A unique identifier with a readable prefix."""
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    @staticmethod
    def sale(location_id: str, *lines: tuple[str, int]) -> SaleRecorded:
        """A till sale of ``(sku, qty)`` lines."""
        return SaleRecorded(
            sale_id=Events.uid("sale"),
            location_id=location_id,
            lines=[
                Line(sku=sku, qty=qty, unit_price=Money(amount=Decimal("9.90"), currency="EUR"))
                for sku, qty in lines
            ],
            occurred_at=NOW,
        )

    @staticmethod
    def receipt(location_id: str, sku: str, qty: int) -> StockAdjusted:
        """Goods received at a location."""
        return Events.adjustment(location_id, sku, "receipt", delta=qty)

    @staticmethod
    def adjustment(
        location_id: str,
        sku: str,
        kind: str,
        *,
        delta: int | None = None,
        counted: int | None = None,
    ) -> StockAdjusted:
        """A receipt, count, damage or transfer leg."""
        return StockAdjusted(
            adjustment_id=Events.uid("adj"),
            location_id=location_id,
            sku=sku,
            kind=kind,
            delta=delta,
            counted=counted,
            occurred_at=NOW,
        )

    @staticmethod
    def order(
        *lines: tuple[str, int],
        pickup_at: str | None = None,
        order_id: str | None = None,
        price: str = "10.00",
    ) -> OrderPlaced:
        """A placed web order: pickup at ``pickup_at``, else delivery."""
        fulfillment = (
            Fulfillment(type="pickup", location_id=pickup_at)
            if pickup_at
            else Fulfillment(
                type="delivery",
                address={
                    "line1": "1 Main St",
                    "city": "Lyon",
                    "postal_code": "69001",
                    "country": "FR",
                },
            )
        )
        return OrderPlaced(
            order_id=order_id or Events.uid("order"),
            customer_id="cust-1",
            channel=Channel.WEB,
            lines=[
                Line(sku=sku, qty=qty, unit_price=Money(amount=Decimal(price), currency="EUR"))
                for sku, qty in lines
            ],
            fulfillment=fulfillment,
        )

    @staticmethod
    def location_body(kind: str = "store", **fields: Any) -> dict[str, Any]:
        """A ``PUT /locations`` body."""
        return {
            "name": fields.pop("name", "A location"),
            "kind": kind,
            "ships_online": fields.pop("ships_online", True),
            "offers_pickup": fields.pop("offers_pickup", kind == "store"),
            "safety_stock": fields.pop("safety_stock", 0),
            "low_stock_threshold": fields.pop("low_stock_threshold", 2),
            **fields,
        }

    @staticmethod
    async def wait_until(predicate: Callable[[], Any], timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """Poll an (async) predicate until it is truthy."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.05)


@pytest.fixture
def ev() -> type[Events]:
    """Event and body builders."""
    return Events


StartInventory = Callable[..., contextlib.AbstractAsyncContextManager[RunningService]]


@pytest.fixture
def start_inventory(omni_env: Any) -> StartInventory:
    """Start an inventory instance on this test's broker prefix and database.

    Several instances started in one test share the consumer group and the schema, as
    replicas of one deployment do. Keyword arguments override settings.
    """

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[RunningService]:
        settings = InventorySettings.from_settings(
            omni_env.settings("inventory"), inventory_timer_poll_s=0.1, **overrides
        )
        async with running(create_app(settings)) as svc:
            yield svc

    return start


@pytest_asyncio.fixture(loop_scope="session")
async def channel(omni_env: Any) -> AsyncIterator[ChannelPublisher]:
    """A channel team's producer on this test's topics."""
    async with ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as publisher:
        yield publisher
