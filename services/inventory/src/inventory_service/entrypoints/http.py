"""Inventory's HTTP API: locations, availability, lost demand and discrepancies.

Every endpoint needs a channel's API key (``Authorization: Bearer <key>``) holding its
scope: ``stock.read`` for locations and availability, ``locations.write`` to change what is
sold where, ``reports.read`` for lost demand and discrepancies.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from omni_common.auth import Caller, require
from omni_common.http import Runtime
from omni_contracts import AvailabilityStatus, BoundedModel, Money
from pydantic import BaseModel, ConfigDict, Field

from inventory_service.adapters.metrics import InventoryMetrics
from inventory_service.adapters.repository import InventoryRepository
from inventory_service.domain import (
    Location,
    LocationKind,
    StockLevel,
    online_available,
    sellable_online,
    stock_status,
)
from inventory_service.service.handlers import Inventory
from inventory_service.service.locations import PolicyChangePending, change_location

Identifier = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]

# Far above any shelf, far below what an integer column holds.
MAX_SAFETY_STOCK = 1_000_000

StockReader = Annotated[Caller, Depends(require("stock.read"))]
LocationWriter = Annotated[Caller, Depends(require("locations.write"))]
ReportReader = Annotated[Caller, Depends(require("reports.read"))]


# -- bodies ------------------------------------------------------------------------------------


class LocationBody(BoundedModel):
    """A store or warehouse as ``PUT /locations/{location_id}`` takes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, examples=["Downtown flagship"])
    kind: LocationKind
    ships_online: bool = Field(default=False, description="Fulfils delivery orders")
    offers_pickup: bool = Field(default=False, description="Shoppers can collect orders here")
    safety_stock: int = Field(
        default=0, ge=0, le=MAX_SAFETY_STOCK, description="Units held back from online sale"
    )
    low_stock_threshold: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SAFETY_STOCK,
        description="At or below this many available units: low_stock",
    )


class LocationView(BaseModel):
    """A location as the API shows it."""

    location_id: str
    name: str
    kind: LocationKind
    ships_online: bool
    offers_pickup: bool
    safety_stock: int
    low_stock_threshold: int

    @classmethod
    def of(cls, location: Location) -> LocationView:
        """The view of a domain location."""
        return cls(
            location_id=location.location_id,
            name=location.name,
            kind=location.kind,
            ships_online=location.ships_online,
            offers_pickup=location.offers_pickup,
            safety_stock=location.safety_stock,
            low_stock_threshold=location.low_stock_threshold,
        )


class StockView(BaseModel):
    """One SKU at one location."""

    sku: str
    location_id: str
    on_hand: int
    reserved: int
    available: int
    status: AvailabilityStatus
    sellable_online: int = Field(description="Units online orders may take here (0 if none)")


class LocationStock(StockView):
    """One location's stock of a SKU, with what the location offers."""

    name: str
    kind: LocationKind
    ships_online: bool
    offers_pickup: bool


class SkuAvailability(BaseModel):
    """A SKU everywhere: per location, and what web and app may sell for delivery."""

    sku: str
    online_available: int
    locations: list[LocationStock]


class LocationAvailability(BaseModel):
    """Every SKU at one location (a page of them, by SKU)."""

    location_id: str
    items: list[StockView]
    next_after: str | None = Field(description="Pass as ?after= for the next page")


class LostDemand(BaseModel):
    """Demand that could not be served: one SKU at one location (None: delivery)."""

    sku: str
    location_id: str | None
    fulfillment: str
    units: int
    revenue: Money
    orders: int
    last_at: datetime


class Discrepancy(BaseModel):
    """A till sold more than the records said was there: count the shelf."""

    id: int
    sku: str
    location_id: str
    sale_id: str
    sold: int
    recorded_available: int
    shortfall: int
    recorded_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None


# -- routes ------------------------------------------------------------------------------------


def _stock_view(level: StockLevel, location: Location) -> StockView:
    return StockView(
        sku=level.sku,
        location_id=level.location_id,
        on_hand=level.on_hand,
        reserved=level.reserved,
        available=level.available,
        status=stock_status(level.available, location.low_stock_threshold),
        sellable_online=sellable_online(level, location) if location.ships_online else 0,
    )


def build_router(
    inventory: Inventory, metrics: InventoryMetrics, default_threshold: int
) -> APIRouter:
    """The inventory API routes, bound to the service's context."""
    router = APIRouter(tags=["inventory"])

    @router.put(
        "/locations/{location_id}",
        response_model=LocationView,
        responses={
            201: {"model": LocationView, "description": "Created"},
            503: {"description": "Another change of this location is being told: retry"},
        },
    )
    async def put_location(
        location_id: Identifier,
        body: LocationBody,
        response: Response,
        runtime: Runtime,
        _caller: LocationWriter,
    ) -> LocationView:
        """Create or update a store or warehouse (201 when created, 200 when updated).

        A change of its shipping, safety stock or threshold is told on
        ``inventory.availability.v1`` for every SKU stocked there whose availability it
        changed before the answer comes.
        """
        location = Location(
            location_id=location_id,
            name=body.name,
            kind=body.kind,
            ships_online=body.ships_online,
            offers_pickup=body.offers_pickup,
            safety_stock=body.safety_stock,
            low_stock_threshold=(
                default_threshold if body.low_stock_threshold is None else body.low_stock_threshold
            ),
        )
        try:
            created = await change_location(
                runtime.transaction,
                inventory,
                location,
                metrics.told_without_cause,
            )
        except PolicyChangePending as exc:
            # Another change of this location is being told right now: a moment's wait.
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "1"}
            ) from exc
        response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return LocationView.of(location)

    @router.get("/locations", response_model=list[LocationView])
    async def list_locations(runtime: Runtime, _caller: StockReader) -> list[LocationView]:
        """Every store and warehouse."""
        async with runtime.pool.acquire() as conn:
            locations = await InventoryRepository(conn).all_locations()
        return [LocationView.of(location) for location in locations]

    @router.get("/locations/{location_id}", response_model=LocationView)
    async def get_location(
        location_id: Identifier, runtime: Runtime, _caller: StockReader
    ) -> LocationView:
        """One store or warehouse (404 if unknown)."""
        async with runtime.pool.acquire() as conn:
            location = await InventoryRepository(conn).location(location_id)
        if location is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown location {location_id!r}")
        return LocationView.of(location)

    @router.get("/availability/{sku}", response_model=SkuAvailability)
    async def sku_availability(
        sku: Identifier, runtime: Runtime, _caller: StockReader
    ) -> SkuAvailability:
        """A SKU at every location, and ``online_available`` (what may be sold for delivery).

        A SKU never stocked anywhere is simply unavailable: no locations, 0 online.
        """
        async with runtime.pool.acquire() as conn:
            rows = await InventoryRepository(conn).availability_of(sku)
        entries: list[LocationStock] = []
        levels: list[StockLevel] = []
        locations: dict[str, Location] = {}
        for row in rows:
            location = Location(
                location_id=row["location_id"],
                name=row["name"],
                kind=LocationKind(row["kind"]),
                ships_online=row["ships_online"],
                offers_pickup=row["offers_pickup"],
                safety_stock=row["safety_stock"],
                low_stock_threshold=row["low_stock_threshold"],
            )
            level = StockLevel(sku, location.location_id, row["on_hand"], row["reserved"])
            levels.append(level)
            locations[location.location_id] = location
            entries.append(
                LocationStock(
                    **_stock_view(level, location).model_dump(),
                    name=location.name,
                    kind=location.kind,
                    ships_online=location.ships_online,
                    offers_pickup=location.offers_pickup,
                )
            )
        return SkuAvailability(
            sku=sku, online_available=online_available(levels, locations), locations=entries
        )

    @router.get("/locations/{location_id}/availability", response_model=LocationAvailability)
    async def location_availability(
        location_id: Identifier,
        runtime: Runtime,
        _caller: StockReader,
        limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
        after: Annotated[
            str | None, Query(max_length=200, pattern=r"^[^\x00]*$", description="Last SKU seen")
        ] = None,
    ) -> LocationAvailability:
        """Every SKU at a location, by SKU, ``limit`` at a time (404 if unknown)."""
        async with runtime.pool.acquire() as conn:
            repo = InventoryRepository(conn)
            location = await repo.location(location_id)
            if location is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown location {location_id!r}")
            levels = await repo.stock_at(location_id, after=after, limit=limit)
        return LocationAvailability(
            location_id=location_id,
            items=[_stock_view(level, location) for level in levels],
            next_after=levels[-1].sku if len(levels) == limit else None,
        )

    @router.get("/lost-demand", response_model=list[LostDemand])
    async def lost_demand(
        runtime: Runtime,
        _caller: ReportReader,
        limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    ) -> list[LostDemand]:
        """The biggest losses: orders we could not serve, by estimated revenue (highest first)."""
        async with runtime.pool.acquire() as conn:
            rows = await InventoryRepository(conn).lost_demand_report(limit)
        return [
            LostDemand(
                sku=row["sku"],
                location_id=row["location_id"],
                fulfillment=row["fulfillment"],
                units=row["units"],
                revenue=Money(amount=Decimal(row["revenue"]), currency=row["currency"]),
                orders=row["orders"],
                last_at=row["last_at"],
            )
            for row in rows
        ]

    @router.get("/discrepancies", response_model=list[Discrepancy])
    async def discrepancies(
        runtime: Runtime,
        _caller: ReportReader,
        open_only: Annotated[
            bool, Query(alias="open", description="Only those no count has settled yet")
        ] = True,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[Discrepancy]:
        """Till sales beyond recorded stock (newest first): shelves to count."""
        async with runtime.pool.acquire() as conn:
            rows = await InventoryRepository(conn).discrepancies(open_only=open_only, limit=limit)
        return [Discrepancy(**row) for row in rows]

    return router
