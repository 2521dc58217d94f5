"""A stock session: the rows of some SKUs, locked for one transaction, and what their
changes tell channels."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from omni_common.handlers import Refusal
from omni_common.service import Tx
from omni_contracts import AvailabilityCause, AvailabilityChanged, AvailabilityStatus
from omni_contracts.envelope import Envelope

from inventory_service.adapters.repository import NO_GUARD, InventoryRepository, StockWrite
from inventory_service.domain import (
    AvailabilityUpdate,
    Key,
    Location,
    Shortfall,
    StockLevel,
    availability_updates,
)


@dataclass
class Outcome:
    """What a unit of work did that metrics care about (observed after it commits)."""

    updates: list[AvailabilityUpdate] = field(default_factory=list)
    shortfalls: list[Shortfall] = field(default_factory=list)


class UnknownLocation(Refusal):
    """An event or request named a location inventory does not know."""

    def __init__(self, location_id: str) -> None:
        super().__init__("unknown_location", f"unknown location {location_id!r}")
        self.location_id = location_id


def availability_event(
    update: AvailabilityUpdate,
    cause: AvailabilityCause,
    changed_at: datetime,
    version: int | None = None,
) -> AvailabilityChanged:
    """The ``inventory.availability.changed`` event telling one update."""
    level = update.level
    return AvailabilityChanged(
        sku=level.sku,
        location_id=level.location_id,
        on_hand=level.on_hand,
        reserved=level.reserved,
        available=level.available,
        status=update.status,
        previous_status=update.previous_status,
        online_available=update.online_available,
        cause=cause,
        changed_at=changed_at,
        safety_stock=update.safety_stock,
        version=version,
    )


class StockSession:
    """Stock of some SKUs (every location), read under their locks; change it, then commit.

    Open one per transaction with :meth:`open`; :meth:`commit` writes the changed rows as
    guarded deltas and queues one availability event per changed row in the outbox.
    """

    def __init__(
        self,
        tx: Tx,
        repo: InventoryRepository,
        levels: dict[Key, StockLevel],
        told: dict[Key, AvailabilityStatus],
        locations: dict[str, Location],
    ) -> None:
        self.tx = tx
        self.repo = repo
        self.locations = locations
        self._before = dict(levels)
        self._levels = levels
        self._told = told
        self._guards: dict[Key, int] = {}

    @classmethod
    async def open(
        cls, tx: Tx, repo: InventoryRepository, skus: Iterable[str], locations: Iterable[str] = ()
    ) -> StockSession:
        """Lock ``skus`` and read their stock, plus the policies of ``locations``."""
        levels, told, known = await repo.lock_and_read(skus, locations)
        return cls(tx, repo, levels, dict(told), known)

    def location(self, location_id: str) -> Location:
        """A location read with the session; :class:`UnknownLocation` if there is none."""
        location = self.locations.get(location_id)
        if location is None:
            raise UnknownLocation(location_id)
        return location

    def level(self, sku: str, location_id: str) -> StockLevel:
        """The (possibly already changed) stock of ``sku`` at ``location_id``."""
        return self._levels.get((sku, location_id)) or StockLevel(sku, location_id)

    def levels(self) -> list[StockLevel]:
        """Every stock row of the session's SKUs, as changed so far."""
        return list(self._levels.values())

    def exists(self, sku: str, location_id: str) -> bool:
        """Whether the row was there when the session opened."""
        return (sku, location_id) in self._before

    def set(self, level: StockLevel, *, min_available: int = NO_GUARD) -> None:
        """Record a row's new stock; ``min_available`` guards the write (holds)."""
        key = (level.sku, level.location_id)
        self._levels[key] = level
        if min_available != NO_GUARD:
            self._guards[key] = max(self._guards.get(key, NO_GUARD), min_available)

    async def commit(
        self,
        cause: AvailabilityCause,
        caused_by: Envelope | None = None,
        *,
        correlation_id: str | None = None,
        locations_before: Mapping[str, Location] | None = None,
    ) -> list[AvailabilityUpdate]:
        """Write the changes and queue their availability events; returns what was told."""
        updates = availability_updates(
            self._before,
            self._levels,
            self._told,
            self.locations,
            locations_before=locations_before,
        )
        told_now = {(u.level.sku, u.level.location_id): u.status for u in updates}
        writes: list[StockWrite] = []
        for key, level in self._levels.items():
            old = self._before.get(key) or StockLevel(*key)
            if key not in told_now and (old.on_hand, old.reserved) == (
                level.on_hand,
                level.reserved,
            ):
                continue
            writes.append(
                StockWrite(
                    sku=key[0],
                    location_id=key[1],
                    on_hand_delta=level.on_hand - old.on_hand,
                    reserved_delta=level.reserved - old.reserved,
                    status=told_now.get(key) or self._told[key],
                    min_available=self._guards.get(key, NO_GUARD),
                )
            )
        await self.repo.write_stock(
            writes, (key for key in self._levels if key not in self._before)
        )
        changed_at = datetime.now(UTC)
        versions = await self.repo.next_versions([u.level.sku for u in updates])
        for update, version in zip(updates, versions, strict=True):
            await self.tx.emit(
                availability_event(update, cause, changed_at, version),
                caused_by=caused_by,
                correlation_id=correlation_id,
            )
        # Further changes in this transaction start from what was just written.
        self._before = dict(self._levels)
        self._told.update(told_now)
        self._guards.clear()
        return updates
