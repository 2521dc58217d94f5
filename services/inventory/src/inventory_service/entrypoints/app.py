"""Composition root of the inventory service."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from fastapi import FastAPI
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_contracts import (
    INVENTORY_AVAILABILITY,
    INVENTORY_RESERVATIONS,
)

from inventory_service.adapters.availability_feed import AvailabilityFeed, StreamMetrics, tailing
from inventory_service.adapters.metrics import InventoryMetrics
from inventory_service.adapters.seed import load_seed
from inventory_service.domain import AvailabilityUpdate
from inventory_service.entrypoints import consumers
from inventory_service.entrypoints.http import build_router
from inventory_service.entrypoints.stream import build_stream_router
from inventory_service.service import handlers, locations
from inventory_service.service.handlers import Inventory
from inventory_service.settings import InventorySettings

log = logging.getLogger(__name__)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the inventory service (nothing connects until the app starts).

    Plain ``ServiceSettings`` (as ``omni run`` and the test fixtures build them) are
    extended with the inventory settings from the environment.
    """
    config = InventorySettings.from_settings(settings)
    runtime = ServiceRuntime(config, migrations_package="inventory_service.migrations")
    inventory = Inventory(
        # Advisory locks are database-wide: name them after the schema they guard.
        lock_namespace=config.schema,
        reservation_ttl=timedelta(seconds=config.inventory_reservation_ttl_s),
        clock=runtime.clock,
        policy_batch=config.inventory_policy_batch,
    )
    metrics = InventoryMetrics(runtime.metrics)
    runtime.provide(inventory=inventory, metrics=metrics)
    runtime.subscribe(*consumers.subscriptions())
    runtime.timers(
        {**consumers.TIMERS, locations.POLICY_CHANGE: locations.policy_changes_due},
        poll_interval_s=config.inventory_timer_poll_s,
    )
    runtime.publishes(INVENTORY_AVAILABILITY, INVENTORY_RESERVATIONS)
    # A till or stock system resends within days; a month of sale and adjustment ids is ample.
    runtime.relay.retain("applied_facts", "applied_at", timedelta(days=35))
    if config.inventory_seed_file:
        runtime.run_alongside(_seeded(runtime, inventory, config))
    feed = AvailabilityFeed(
        StreamMetrics(config.service_name, runtime.metrics.registry),
        ring_size=config.inventory_stream_ring,
        queue_size=config.inventory_stream_queue,
        max_clients=config.inventory_stream_max_clients,
    )
    # The stream reads the topic the outbox writes (see availability_feed: why).
    runtime.kafka.declare_read(INVENTORY_AVAILABILITY)
    runtime.run_alongside(tailing(feed, runtime.kafka, warm=config.inventory_stream_warm))
    return create_http_app(
        runtime,
        title="Inventory service",
        description=(
            "Stock per SKU and location, reservations for online orders, and what web and app "
            "may sell. Every endpoint needs `Authorization: Bearer <API key>`, except the public "
            "availability stream."
        ),
        routers=[
            # Before /availability/{sku}, which would take "stream" for a SKU.
            build_stream_router(feed, config.inventory_stream_heartbeat_s),
            build_router(inventory, metrics, config.inventory_low_stock_threshold),
        ],
    )


async def seed_from_file(
    runtime: ServiceRuntime, inventory: Inventory, source: str, default_threshold: int
) -> None:
    """Create or update the seed file's locations and fill its missing stock rows.

    Idempotent: safe on every start of every instance.
    """
    seed = load_seed(source)
    for entry in seed.locations:
        # Each its own transactions: a changed policy is told in batches (service.locations).
        await locations.change_location(
            runtime.transaction, inventory, entry.to_location(default_threshold), _unobserved
        )
    async with runtime.transaction() as tx:
        await handlers.seed_stock(inventory, tx, [entry.to_level() for entry in seed.stock])
    log.info(
        "seeded %d locations and %d stock rows from %s",
        len(seed.locations),
        len(seed.stock),
        source,
    )


def _unobserved(_: list[AvailabilityUpdate]) -> None:
    """Seeding tells no metric: it is set-up, not the business."""


@contextlib.asynccontextmanager
async def _seeded(
    runtime: ServiceRuntime, inventory: Inventory, config: InventorySettings
) -> AsyncIterator[None]:
    """Seed once the database is up, before the service reports ready."""
    assert config.inventory_seed_file is not None
    await seed_from_file(
        runtime, inventory, config.inventory_seed_file, config.inventory_low_stock_threshold
    )
    yield
