"""Composition root of the order service."""

from __future__ import annotations

from fastapi import FastAPI
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_contracts import ORDER_LIFECYCLE

from order_service.adapters.metrics import OrderMetrics
from order_service.entrypoints import consumers
from order_service.entrypoints.http import router
from order_service.service.orders import OrderService
from order_service.settings import OrderSettings

DESCRIPTION = """Orders of every channel (in-store sales become completed orders), their state
machine, the stock reservation saga, pickup in store, delivery promises, returns and refunds.
Publishes `order.lifecycle.v1`."""


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the order service (nothing connects until the app starts).

    Accepts plain platform settings (e.g. a test's) and reads the order's own settings
    (``PICKUP_COLLECT_DAYS``...) from the environment on top of them.
    """
    order_settings = OrderSettings.from_settings(settings)
    runtime = ServiceRuntime(order_settings, migrations_package="order_service.migrations")
    metrics = OrderMetrics(runtime.metrics.registry, order_settings.service_name)
    orders = OrderService(order_settings, metrics, clock=runtime.clock)
    runtime.provide(orders=orders)
    runtime.on_refusal(metrics.refused)
    runtime.subscribe(*consumers.subscriptions())
    runtime.timers(consumers.TIMERS, poll_interval_s=order_settings.timer_poll_interval_s)
    runtime.publishes(ORDER_LIFECYCLE)
    runtime.run_alongside(
        metrics.refreshing(
            lambda: orders.count_by_status(runtime), order_settings.status_gauge_interval_s
        )
    )
    app = create_http_app(runtime, title="Order service", description=DESCRIPTION, routers=[router])
    app.state.orders = orders
    return app
