"""Seed files: locations (and their first stock) loaded when the service starts.

A seed file is YAML or JSON::

    locations:
      - location_id: store-001
        name: Downtown
        kind: store            # store | warehouse
        ships_online: true
        offers_pickup: true
        safety_stock: 1
        low_stock_threshold: 3
    stock:                     # optional: on-hand for rows that do not exist yet
      - {sku: SKU-1, location_id: store-001, on_hand: 12}

Locations are created or updated on every start; stock only fills rows that are missing,
so restarting never overwrites live stock.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field

from inventory_service.domain import Location, LocationKind, StockLevel

DEMO = "demo"
"""``INVENTORY_SEED_FILE=demo`` loads the demo stores and warehouse shipped with the service."""

Identifier = Annotated[str, Field(min_length=1, max_length=200)]


class LocationSeed(BaseModel):
    """One location of a seed file."""

    model_config = ConfigDict(extra="forbid")

    location_id: Identifier
    name: Identifier
    kind: LocationKind
    ships_online: bool = False
    offers_pickup: bool = False
    safety_stock: int = Field(default=0, ge=0)
    low_stock_threshold: int | None = Field(default=None, ge=0)

    def to_location(self, default_threshold: int) -> Location:
        """The domain location (``default_threshold`` when the file names none)."""
        threshold = self.low_stock_threshold
        return Location(
            location_id=self.location_id,
            name=self.name,
            kind=self.kind,
            ships_online=self.ships_online,
            offers_pickup=self.offers_pickup,
            safety_stock=self.safety_stock,
            low_stock_threshold=default_threshold if threshold is None else threshold,
        )


class StockSeed(BaseModel):
    """Initial on-hand of one SKU at one location."""

    model_config = ConfigDict(extra="forbid")

    sku: Identifier
    location_id: Identifier
    on_hand: int = Field(ge=0)

    def to_level(self) -> StockLevel:
        """The domain stock level."""
        return StockLevel(self.sku, self.location_id, on_hand=self.on_hand)


class SeedFile(BaseModel):
    """A whole seed file."""

    model_config = ConfigDict(extra="forbid")

    locations: list[LocationSeed] = Field(default_factory=list)
    stock: list[StockSeed] = Field(default_factory=list)


def demo_seed_path() -> Path:
    """The demo seed file shipped in the package."""
    return Path(str(resources.files("inventory_service.seed").joinpath("demo.yaml")))


def load_seed(source: str | Path) -> SeedFile:
    """Read a seed file (``.json``, else YAML); ``"demo"`` is the shipped demo file.

    Raises ``ValueError`` with the file name when it is missing or invalid.
    """
    path = demo_seed_path() if str(source) == DEMO else Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"seed file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return SeedFile.model_validate(data or {})
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"seed file {path} is invalid: {exc}") from exc
