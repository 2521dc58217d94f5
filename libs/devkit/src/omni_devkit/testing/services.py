"""Running real service apps inside a test process (lifespan and HTTP, no uvicorn)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from omni_common.service import ServiceRuntime


class RunningService:
    """A started service: its runtime and an HTTP client that talks to it in-process."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.app = app
        self.http = client

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
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://service", headers=headers
        ) as client,
    ):
        yield RunningService(app, client)
