"""A request that loses a race in the database is run again, and never answers 500."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
from fastapi import APIRouter
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from pydantic import BaseModel


class Body(BaseModel):
    value: int


def _app(lose: int) -> tuple[Any, list[int]]:
    """An app whose route loses ``lose`` races (a deadlock), then wins."""
    seen: list[int] = []
    router = APIRouter()

    @router.post("/things")
    async def post_thing(body: Body) -> dict[str, int]:
        seen.append(body.value)
        if len(seen) <= lose:
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return {"value": body.value, "attempts": len(seen)}

    runtime = ServiceRuntime(ServiceSettings(service_name="racer"))
    return create_http_app(runtime, title="racer", routers=[router]), seen


async def _post(app: Any) -> httpx.Response:
    # As a server would: an app error is a 500 response, not an exception in the client.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        return await client.post("/things", json={"value": 7})


async def test_a_lost_race_is_run_again_with_the_same_body() -> None:
    app, seen = _app(lose=2)
    response = await _post(app)
    assert response.status_code == 200, response.text
    assert response.json() == {"value": 7, "attempts": 3}
    assert seen == [7, 7, 7]


async def test_a_race_lost_every_time_answers_503_with_retry_after() -> None:
    app, seen = _app(lose=10**6)
    response = await _post(app)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["detail"]["reason"] == "contention"
    assert 1 < len(seen) < 10  # bounded


async def test_other_failures_are_not_run_again() -> None:
    router = APIRouter()
    calls: list[int] = []

    @router.post("/things")
    async def post_thing() -> None:
        calls.append(1)
        raise RuntimeError("a bug")

    runtime = ServiceRuntime(ServiceSettings(service_name="buggy"))
    response = await _post(create_http_app(runtime, title="buggy", routers=[router]))
    assert response.status_code == 500
    assert calls == [1]
