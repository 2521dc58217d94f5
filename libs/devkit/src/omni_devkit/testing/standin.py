"""A stand-in service app: probes only, for testing the dev stack without real services.

Point a service name at it with ``OMNI_SERVICES="order=omni_devkit.testing.standin:create_app"``.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from omni_common.settings import ServiceSettings

from omni_devkit.devstack.process import port_accepts


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """A FastAPI app with ``/healthz`` and a ``/readyz`` that checks PostgreSQL and Kafka."""
    settings = settings or ServiceSettings()
    app = FastAPI(title=f"stand-in {settings.service_name}")

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
