"""Composition root of the customer-profile service."""

from __future__ import annotations

from fastapi import FastAPI
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_contracts import CART_ABANDONED, CUSTOMER_PROFILE

from customer_profile_service.adapters.metrics import ProfileMetrics
from customer_profile_service.domain import DEFAULT_BLOCKED, CartLimits, parse_limits
from customer_profile_service.entrypoints import consumers
from customer_profile_service.entrypoints.http import build_router, build_unmerge_router
from customer_profile_service.service.context import Profiles
from customer_profile_service.settings import ProfileSettings

DESCRIPTION = """One profile per shopper across every channel (identities, contact, consent,
preferences), one purchase history, and carts that notice they were abandoned. Publishes
`customer.profile.v1` (compacted snapshots, merges, erasures) and `cart.abandoned.v1`.
Every endpoint needs `Authorization: Bearer <API key>`."""


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the customer-profile service (nothing connects until the app starts).

    Plain ``ServiceSettings`` (as ``omni run`` and the test fixtures build them) are
    extended with this service's settings from the environment.
    """
    config = ProfileSettings.from_settings(settings)
    runtime = ServiceRuntime(config, migrations_package="customer_profile_service.migrations")
    extra_blocked = {
        v.strip().lower() for v in config.profile_blocked_identifiers.split(",") if v.strip()
    }
    profiles = Profiles(
        limits=parse_limits(config.profile_identity_limits),
        blocked=DEFAULT_BLOCKED | extra_blocked,
        cart_limits=CartLimits(config.cart_max_lines, config.cart_max_qty),
        abandonment_delay=config.cart_abandonment_delay,
        max_devices=config.profile_max_push_devices,
        lock_namespace=config.schema,
        clock=runtime.clock,
    )
    runtime.provide(policy=profiles, metrics=ProfileMetrics(runtime.metrics))
    runtime.subscribe(*consumers.subscriptions())
    runtime.timers(
        consumers.TIMERS,
        poll_interval_s=config.cart_timer_poll_s,
        batch_size=config.cart_timer_batch,
        per_transaction=config.cart_timer_per_transaction,
        concurrency=config.cart_timer_concurrency,
    )
    runtime.publishes(CUSTOMER_PROFILE, CART_ABANDONED)
    app = create_http_app(
        runtime,
        title="Customer profile service",
        description=DESCRIPTION,
        routers=[build_router(), build_unmerge_router(profiles)],
    )
    return app
