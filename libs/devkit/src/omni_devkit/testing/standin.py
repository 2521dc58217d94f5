"""A stand-in service app: probes and a metrics port only, for testing the dev stack
without real services.

Point a service name at it with ``OMNI_SERVICES="order=omni_devkit.testing.standin:create_app"``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from omni_common.http import serve_metrics
from omni_common.metrics import PlatformMetrics
from omni_common.settings import ServiceSettings

from omni_devkit.devstack.process import port_accepts


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """A FastAPI app with ``/healthz``, a ``/readyz`` that checks PostgreSQL and Kafka, and
    the platform's metrics on ``METRICS_PORT``, as a real service has them."""
    settings = settings or ServiceSettings()
    metrics = PlatformMetrics(settings.service_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with serve_metrics(metrics.registry, settings.http_host, settings.metrics_port):
            metrics.ready.labels(settings.service_name).set(1)
            yield

    app = FastAPI(title=f"stand-in {settings.service_name}", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        import asyncpg

        try:
            conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=2)
            await conn.close()
        except Exception as exc:
            return JSONResponse({"status": "not ready", "reason": f"database: {exc}"}, 503)
        host, _, port = settings.kafka_bootstrap_servers.split(",")[0].rpartition(":")
        if not await asyncio.to_thread(port_accepts, host, int(port)):
            return JSONResponse({"status": "not ready", "reason": "kafka unreachable"}, 503)
        return JSONResponse({"status": "ready", "service": settings.service_name})

    return app
