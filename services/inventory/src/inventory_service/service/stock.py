"""A stock session: the rows of some SKUs, locked for one transaction, and what their
changes tell channels."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from omni_common.handlers import Clock, Refusal
from omni_common.service import Tx
from omni_contracts import AvailabilityCause, AvailabilityChanged, AvailabilityStatus, utcnow
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


_SHARED = "inventory.stock"

Told = tuple[AvailabilityUpdate, AvailabilityCause, Envelope | None, str | None]
"""An availability change told and not yet written: what, why, caused by, journey."""


class StockSession:
    """Stock of some SKUs (every location), read under their locks; change it, tell it, then
    commit.

    One per transaction (:meth:`open`): every handler of a lot shares it, so the stock its
    ``prepare`` read serves them all, and rows named later are locked and read on the way.
    :meth:`tell` queues what the changes since the last tell mean to channels, caused by
    one event; :meth:`commit` writes every changed row in one statement and the queued
    availability events, versioned, to the outbox.
    """

    def __init__(
        self,
        tx: Tx,
        repo: InventoryRepository,
        levels: dict[Key, StockLevel],
        told: dict[Key, AvailabilityStatus],
        locations: dict[str, Location],
        clock: Clock,
    ) -> None:
        self.tx = tx
        self.repo = repo
        self.locations = locations
        self.clock = clock
        self._levels = levels
        self._written = dict(levels)  # as read, or as last written
        self._said = dict(levels)  # as last told
        self._told = told
        self._skus = {sku for sku, _ in levels}
        self._asked: set[str] = set(locations)
        self._keep: dict[Key, int] = {}
        self._dirty: set[str] = set()  # SKUs changed since the last tell
        self._pending: list[
            tuple[AvailabilityUpdate, AvailabilityCause, Envelope | None, str | None]
        ] = []

    @classmethod
    async def open(
        cls,
        tx: Tx,
        repo: InventoryRepository,
        skus: Iterable[str],
        locations: Iterable[str] = (),
        clock: Clock = utcnow,
    ) -> StockSession:
        """The transaction's session, with ``skus`` locked and read and the policies of
        ``locations`` (and of every location stocking them)."""
        skus, locations = set(skus), set(locations)
        session: StockSession | None = tx.shared.get(_SHARED)
        if session is None:
            levels, told, known = await repo.lock_and_read(skus, locations)
            session = tx.shared[_SHARED] = cls(tx, repo, levels, dict(told), known, clock)
            session._skus |= skus
            session._asked |= locations
            return session
        await session._cover(skus - session._skus, locations - session._asked)
        return session

    async def _cover(self, skus: set[str], locations: set[str]) -> None:
        """Lock and read rows not read yet (their SKUs' rows are disjoint from the others)."""
        if not skus and not locations:
            return
        levels, told, known = await self.repo.lock_and_read(skus, locations)
        for key, level in levels.items():
            if key not in self._levels:
                self._levels[key] = self._written[key] = self._said[key] = level
                self._told[key] = told[key]
        for location_id, location in known.items():
            self.locations.setdefault(location_id, location)
        self._skus |= skus
        self._asked |= locations

    def location(self, location_id: str) -> Location:
        """A location read with the session; :class:`UnknownLocation` if there is none."""
        location = self.locations.get(location_id)
        if location is None:
            raise UnknownLocation(location_id)
        return location

    def level(self, sku: str, location_id: str) -> StockLevel:
        """The (possibly already changed) stock of ``sku`` at ``location_id``."""
        return self._levels.get((sku, location_id)) or StockLevel(sku, location_id)

    def levels(self, skus: Iterable[str] | None = None) -> list[StockLevel]:
        """The stock rows (of ``skus``, or all) as changed so far."""
        if skus is None:
            return list(self._levels.values())
        wanted = set(skus)
        return [level for (sku, _), level in self._levels.items() if sku in wanted]

    def exists(self, sku: str, location_id: str) -> bool:
        """Whether the row was there when the session read it."""
        return (sku, location_id) in self._written

    def set(self, level: StockLevel, *, keep: int | None = None) -> None:
        """Record a row's new stock; ``keep`` (holds): what must stay available after it,
        checked again by the write (the backstop of the plan's promise)."""
        key = (level.sku, level.location_id)
        self._levels[key] = level
        self._dirty.add(level.sku)
        if keep is not None:
            self._keep[key] = max(self._keep.get(key, 0), keep)

    def tell(
        self,
        cause: AvailabilityCause,
        caused_by: Envelope | None = None,
        *,
        correlation_id: str | None = None,
        locations_before: Mapping[str, Location] | None = None,
    ) -> list[AvailabilityUpdate]:
        """Queue what the changes since the last tell mean to channels, caused by one event.

        Only the SKUs changed since are looked at (all of them after a policy change)."""
        if locations_before is None:
            dirty = self._dirty
            before = {k: v for k, v in self._said.items() if k[0] in dirty}
            after = {k: v for k, v in self._levels.items() if k[0] in dirty}
        else:
            before, after = self._said, self._levels
        self._dirty = set()
        updates = availability_updates(
            before, after, self._told, self.locations, locations_before=locations_before
        )
        for update in updates:
            self._told[(update.level.sku, update.level.location_id)] = update.status
            self._pending.append((update, cause, caused_by, correlation_id))
        self._said.update(after)
        return updates

    async def commit(
        self,
        cause: AvailabilityCause | None = None,
        caused_by: Envelope | None = None,
        *,
        correlation_id: str | None = None,
        locations_before: Mapping[str, Location] | None = None,
    ) -> list[AvailabilityUpdate]:
        """Tell what is left untold (as ``cause``), write every changed row as a guarded delta
        in one statement, and queue the availability events told since the last commit;
        returns them."""
        if cause is not None:
            self.tell(
                cause, caused_by, correlation_id=correlation_id, locations_before=locations_before
            )
        pending, self._pending = self._pending, []
        told_now = {(u.level.sku, u.level.location_id) for u, _, _, _ in pending}
        writes: list[StockWrite] = []
        for key, level in self._levels.items():
            old = self._written.get(key) or StockLevel(*key)
            on_hand_delta, reserved_delta = (
                level.on_hand - old.on_hand,
                level.reserved - old.reserved,
            )
            if key not in told_now and (on_hand_delta, reserved_delta) == (0, 0):
                continue
            keep = self._keep.get(key)
            writes.append(
                StockWrite(
                    sku=key[0],
                    location_id=key[1],
                    on_hand_delta=on_hand_delta,
                    reserved_delta=reserved_delta,
                    status=self._told.get(key, AvailabilityStatus.OUT_OF_STOCK),
                    # Available before >= keep + what leaves it: available after >= keep.
                    min_available=(
                        NO_GUARD if keep is None else keep + reserved_delta - on_hand_delta
                    ),
                )
            )
        versions = await self.repo.write_stock(
            writes,
            (key for key in self._levels if key not in self._written),
            [u.level.sku for u, _, _, _ in pending],
        )
        self._written = dict(self._levels)
        self._keep.clear()
        if not pending:
            return []
        changed_at = self.clock()
        for (update, why, cause_of, correlation), version in zip(pending, versions, strict=True):
            await self.tx.emit(
                availability_event(update, why, changed_at, version),
                caused_by=cause_of,
                correlation_id=correlation,
            )
        return [update for update, _, _, _ in pending]
