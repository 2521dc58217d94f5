"""Running real service apps inside a test process: in-process (lifespan and ASGI, no
uvicorn) with :func:`running`, or behind a real HTTP server on loopback with :func:`served`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI
from omni_common.service import ServiceRuntime

from omni_devkit.devstack.process import free_port


class RunningService:
    """A started service: its runtime, an HTTP client that talks to its API in-process, and
    one that scrapes its metrics port (``metrics.get("/metrics")``), a real listener."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient, metrics: httpx.AsyncClient) -> None:
        self.app = app
        self.http = client
        self.metrics = metrics

    @property
    def runtime(self) -> ServiceRuntime:
        """The service's runtime (pool, settings, metrics)."""
        runtime: ServiceRuntime = self.app.state.runtime
        return runtime


@contextlib.asynccontextmanager
async def running(app: FastAPI, api_key: str | None = "test-key") -> AsyncIterator[RunningService]:
    """Start ``app`` (migrations, consumers, relay) and stop it cleanly afterwards.

    The HTTP client sends ``Authorization: Bearer <api_key>`` unless ``api_key`` is None.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with app.router.lifespan_context(app):
        host, port = app.state.metrics_address
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://service", headers=headers
            ) as client,
            httpx.AsyncClient(base_url=f"http://{host}:{port}") as metrics,
        ):
            yield RunningService(app, client, metrics)


@contextlib.asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """Run ``app`` (lifespan included) under uvicorn on a free loopback port; yields its URL.

    For clients that need real sockets (server-sent events read by raw connections).
    """
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
