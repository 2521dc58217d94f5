"""The HTTP side of every service: probes, metrics, authentication, request metrics."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from omni_contracts.asyncapi import service_document, to_html, to_yaml
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from omni_common.service import ServiceRuntime

_bearer = HTTPBearer(auto_error=False, description="A channel's API key")


def authenticated_channel(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The channel whose API key authenticates this request; 401 without a valid key."""
    runtime: ServiceRuntime = request.app.state.runtime
    if credentials is not None and credentials.scheme.lower() == "bearer":
        given = credentials.credentials.encode()
        for key, channel in runtime.settings.api_key_map.items():
            # Constant-time comparison: no timing oracle on the keys.
            if hmac.compare_digest(given, key.encode()):
                return channel
    raise HTTPException(
        status_code=401,
        detail="a valid API key is required (Authorization: Bearer <key>)",
        headers={"WWW-Authenticate": "Bearer"},
    )


Channel = Annotated[str, Depends(authenticated_channel)]
"""Route parameter type for endpoints that need authentication."""


def create_http_app(
    runtime: ServiceRuntime,
    *,
    title: str,
    description: str = "",
    routers: list[APIRouter] | None = None,
) -> FastAPI:
    """A FastAPI app that starts and stops ``runtime`` with it and serves the probes."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title=title, description=description, lifespan=lifespan, version="1.0.0")
    app.state.runtime = runtime
    metrics = runtime.metrics

    @app.middleware("http")
    async def red_metrics(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            if path not in ("/metrics", "/healthz", "/readyz"):
                metrics.http_requests.labels(
                    metrics.service, request.method, path, str(status)
                ).inc()
                metrics.http_duration.labels(metrics.service, request.method, path).observe(
                    time.perf_counter() - started
                )

    @app.get("/healthz", tags=["probes"], include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], include_in_schema=False)
    async def readyz() -> JSONResponse:
        """Readiness: database reachable, broker connected, consumers running."""
        problem = await runtime.check_ready()
        if problem:
            return JSONResponse({"status": "not ready", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    # Public, like the contract itself; not in the OpenAPI document of the service's API.
    @app.get("/asyncapi.yaml", response_class=PlainTextResponse, include_in_schema=False)
    async def asyncapi_yaml() -> PlainTextResponse:
        """The AsyncAPI 3 document of the events this service consumes and produces."""
        return PlainTextResponse(to_yaml(_service_contract(runtime)), media_type="application/yaml")

    @app.get("/asyncapi", response_class=HTMLResponse, include_in_schema=False)
    async def asyncapi_page() -> HTMLResponse:
        """The same document as a readable page, for channel teams."""
        return HTMLResponse(to_html(_service_contract(runtime)))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of this service's metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for router in routers or []:
        app.include_router(router)
    return app


def _service_contract(runtime: ServiceRuntime) -> dict[str, object]:
    kafka = runtime.kafka
    return service_document(
        runtime.settings.service_name, consumes=kafka.consumes, produces=kafka.produces
    )


def request_runtime(request: Request) -> ServiceRuntime:
    """The runtime of the app serving ``request`` (a FastAPI dependency)."""
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


Runtime = Annotated[ServiceRuntime, Depends(request_runtime)]
"""Route parameter type giving the service runtime."""
