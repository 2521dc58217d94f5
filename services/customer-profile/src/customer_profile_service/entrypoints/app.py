"""Composition root of the customer-profile service."""

from __future__ import annotations

from fastapi import FastAPI
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the customer-profile service (nothing connects until the app starts)."""
    settings = settings or ServiceSettings(service_name="customer-profile")
    runtime = ServiceRuntime(settings, migrations_package="customer_profile_service.migrations")
    return create_http_app(runtime, title="Customer profile service")
