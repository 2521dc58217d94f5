"""Composition root of the loyalty service."""

from __future__ import annotations

from fastapi import FastAPI
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_contracts import LOYALTY_LEDGER

from loyalty_service.adapters.metrics import LoyaltyMetrics
from loyalty_service.entrypoints import consumers
from loyalty_service.entrypoints.http import router
from loyalty_service.service.ledger import LoyaltyService
from loyalty_service.settings import LoyaltySettings

DESCRIPTION = """Loyalty points earned in every channel (pending until the return window
closes), held and redeemed in the checkout saga, reversed on returns, expired after
inactivity; tiers and co-purchase offers. Publishes `loyalty.ledger.v1`."""


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the loyalty service (nothing connects until the app starts).

    Accepts plain platform settings (e.g. a test's) and reads the loyalty rules
    (``LOYALTY_PENDING_DAYS``...) from the environment on top of them.
    """
    loyalty_settings = LoyaltySettings.from_settings(settings)
    runtime = ServiceRuntime(loyalty_settings, migrations_package="loyalty_service.migrations")
    metrics = LoyaltyMetrics(runtime.metrics)
    loyalty = LoyaltyService(loyalty_settings, metrics, clock=runtime.clock)
    runtime.provide(loyalty=loyalty)
    runtime.subscribe(*consumers.subscriptions())
    runtime.timers(consumers.TIMERS, poll_interval_s=loyalty_settings.loyalty_timer_poll_s)
    runtime.publishes(LOYALTY_LEDGER)

    app = create_http_app(
        runtime, title="Loyalty service", description=DESCRIPTION, routers=[router]
    )
    app.state.loyalty = loyalty
    return app
