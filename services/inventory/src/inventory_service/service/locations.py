"""Changing a location: the row at once, then what a policy change tells, in bounded batches.

A change of a location's policy (shipping, safety stock, low-stock threshold) can change the
status and ``online_available`` of every SKU stocked there. Telling them all in the
transaction that saves the location took one advisory lock per SKU: at a location of many
SKUs the shared lock table (``max_locks_per_transaction``) overflowed and the change
failed. So the change is saved with a record of the policy told until then
(``location_policy_changes``) and a durable timer, both in one short transaction; the SKUs
are then told ``Inventory.policy_batch`` at a time, each batch in its own transaction under
the usual SKU locks, by the request that made the change and, should it not finish (a crash,
an outage), by the timer on any instance.

Availability stays right throughout: a stock change committed after the save reads the new
policy, and each batch reads, under its SKUs' locks, the stock and the policy as they are
then; so every event of a SKU tells the truth at its commit, and the last one the latest
(``online_available`` never goes back in time). A second change of the location waits until
the first is told whole, so one record of the policy told before is always enough.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from omni_common.handlers import Due
from omni_common.service import Tx
from omni_common.timers import set_timer
from omni_contracts import AvailabilityCause

from inventory_service.adapters.metrics import InventoryMetrics
from inventory_service.domain import AvailabilityUpdate, Location
from inventory_service.service.handlers import Inventory
from inventory_service.service.stock import StockSession

POLICY_CHANGE = "location-policy"
"""Timer kind: tell the rest of a location's policy change (keyed by ``location_id``)."""

# The timer is the safety net of the request telling the change itself: due once that
# request would have long finished.
TELL_WITHIN = timedelta(seconds=30)

Transaction = Callable[[], contextlib.AbstractAsyncContextManager[Tx]]
Observe = Callable[[list[AvailabilityUpdate]], None]


class PolicyChangePending(RuntimeError):
    """The location's previous policy change is still being told: try again shortly."""

    def __init__(self, location_id: str) -> None:
        super().__init__(f"the previous policy change of {location_id!r} is still being told")
        self.location_id = location_id


def _policy(location: Location) -> tuple[bool, int, int]:
    return location.ships_online, location.safety_stock, location.low_stock_threshold


async def begin_location_change(
    inv: Inventory, tx: Tx, location: Location, *, tell_by: datetime
) -> tuple[bool, bool]:
    """Create or update a location; returns (created, policy changed).

    A policy change is recorded to be told (:func:`tell_policy_batch`), at the latest from
    ``tell_by`` on by its timer. Raises :class:`PolicyChangePending` when the previous one
    is not told whole yet (nothing is saved then).
    """
    repo = inv.repo(tx)
    old = await repo.location(location.location_id, for_update=True)
    changed = old is not None and _policy(old) != _policy(location)
    if changed and await repo.policy_change(location.location_id) is not None:
        raise PolicyChangePending(location.location_id)
    created = await repo.save_location(location)
    if changed:
        assert old is not None
        await repo.start_policy_change(old)
        await set_timer(tx.conn, POLICY_CHANGE, location.location_id, tell_by)
    return created, changed


async def tell_policy_batch(
    inv: Inventory, tx: Tx, location_id: str
) -> tuple[list[AvailabilityUpdate], bool]:
    """Tell the next ``policy_batch`` SKUs of a location's pending policy change whose
    status or ``online_available`` it changed; returns (what was told, whether it is all).

    Holds the change's record for the transaction, so batches of one change never overlap.
    """
    repo = inv.repo(tx)
    pending = await repo.policy_change(location_id, lock=True)
    if pending is None:
        return [], True
    levels = await repo.stock_at(location_id, after=pending.after_sku, limit=inv.policy_batch)
    skus = [level.sku for level in levels]
    updates: list[AvailabilityUpdate] = []
    if skus:
        stock = await StockSession.open(tx, repo, skus, [location_id], inv.clock)
        now = stock.locations.get(location_id)
        if now is not None:
            before = dict(stock.locations) | {location_id: pending.told(now)}
            updates = await stock.commit(AvailabilityCause.ADJUSTMENT, locations_before=before)
    done = len(skus) < inv.policy_batch
    await repo.advance_policy_change(location_id, None if done else skus[-1])
    return updates, done


async def tell_policy_change(
    transaction: Transaction, inv: Inventory, location_id: str, observe: Observe
) -> None:
    """Tell whatever is left of a location's policy change, a batch per transaction."""
    done = False
    while not done:
        async with transaction() as tx:
            updates, done = await tell_policy_batch(inv, tx, location_id)
        observe(updates)


async def change_location(
    transaction: Transaction,
    inv: Inventory,
    location: Location,
    observe: Observe,
    *,
    attempts: int = 3,
) -> bool:
    """Create or update a location and tell what its policy change changed; True if it
    was created. ``observe`` gets each batch's updates once committed.

    A previous change of the location still being told is told first. Raises
    :class:`PolicyChangePending` if, ``attempts`` times, another was begun meanwhile.
    """
    for _ in range(attempts):
        await tell_policy_change(transaction, inv, location.location_id, observe)
        try:
            async with transaction() as tx:
                created, changed = await begin_location_change(
                    inv, tx, location, tell_by=datetime.now(UTC) + TELL_WITHIN
                )
        except PolicyChangePending:
            continue
        if changed:
            await tell_policy_change(transaction, inv, location.location_id, observe)
        return created
    raise PolicyChangePending(location.location_id)


async def policy_changes_due(
    due: list[Due], tx: Tx, inventory: Inventory, metrics: InventoryMetrics
) -> None:
    """Timer: tell a batch of each policy change left untold, and come again for the next."""
    for timer in due:
        updates, done = await tell_policy_batch(inventory, tx, timer.key)
        tx.after_commit(functools.partial(metrics.told_without_cause, updates))
        if not done:
            await set_timer(tx.conn, POLICY_CHANGE, timer.key, datetime.now(UTC))
