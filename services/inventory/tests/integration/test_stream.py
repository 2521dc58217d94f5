"""``GET /availability/stream`` over real HTTP (uvicorn), a real broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from inventory_service.entrypoints.app import create_app
from inventory_service.settings import InventorySettings
from omni_devkit.testing.services import served

pytestmark = pytest.mark.integration


@dataclass
class Served:
    """An inventory instance behind a real HTTP server."""

    url: str
    app: Any
    http: httpx.AsyncClient

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the instance's Prometheus registry (0 when absent)."""
        registry = self.app.state.runtime.metrics.registry
        value = registry.get_sample_value(name, {"service": "inventory", **labels})
        return value or 0.0


@contextlib.asynccontextmanager
async def serving(omni_env: Any, **overrides: Any) -> AsyncIterator[Served]:
    """Run inventory under uvicorn on a free port until the block ends."""
    settings = InventorySettings.from_settings(
        omni_env.settings("inventory"), inventory_timer_poll_s=0.1, **overrides
    )
    app = create_app(settings)
    async with (
        served(app) as url,
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": "Bearer test-key"}, timeout=10
        ) as http,
    ):
        yield Served(url, app, http)


class SseReader:
    """Reads one event stream: its events (name, id, data) as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 10.0) -> tuple[str, str, dict[str, Any]]:  # noqa: ASYNC109
        """The next event (comments and retry lines skipped)."""
        name, ident, data = "message", "", ""
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if not line:
                    if data:
                        return name, ident, json.loads(data)
                    continue
                field, _, value = line.partition(": ")
                if field == "event":
                    name = value
                elif field == "id":
                    ident = value
                elif field == "data":
                    data = value
        raise EOFError("stream ended")

    async def until(self, predicate: Any, timeout: float = 10.0) -> tuple[str, str, dict]:  # noqa: ASYNC109
        """The first event for which ``predicate(name, data)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            name, ident, data = await self.next(max(deadline - time.monotonic(), 0.01))
            if predicate(name, data):
                return name, ident, data


@contextlib.asynccontextmanager
async def stream(
    url: str, headers: dict[str, str] | None = None, **params: Any
) -> AsyncIterator[SseReader]:
    """An anonymous stream client (no API key: the stream is public)."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, read=30)) as client,
        client.stream("GET", "/availability/stream", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseReader(response)


async def _store(served: Served, ev: Any, location_id: str) -> None:
    response = await served.http.put(
        f"/locations/{location_id}", json=ev.location_body(low_stock_threshold=1)
    )
    assert response.status_code in (200, 201), response.text


async def test_a_sale_reaches_a_stream_client_and_a_reconnect_misses_nothing(
    omni_env, channel, ev
) -> None:
    async with serving(omni_env) as inventory:
        store, sku = ev.uid("store"), ev.uid("SKU")
        await _store(inventory, ev, store)
        async with stream(inventory.url, sku=sku) as events:
            name, ready_id, _ = await events.next()
            assert name == "ready" and ready_id
            await channel.publish(ev.receipt(store, sku, 2))
            _, _, data = await events.until(lambda n, d: n == "availability")
            assert data["available"] == 2 and data["status"] == "in_stock"
            # The stock room's figures stay behind the API key.
            assert "on_hand" not in data and "reserved" not in data

            sale = ev.sale(store, (sku, 1))
            await channel.publish(sale)
            _, seen_id, data = await events.until(lambda n, d: d.get("available") == 1)
            assert data["cause"] == "sale" and data["status"] == "low_stock"

        # Disconnected; two more changes happen meanwhile.
        await channel.publish(ev.sale(store, (sku, 1)))
        await channel.publish(ev.receipt(store, sku, 5))
        await ev.wait_until(lambda: inventory.metric("omni_inventory_stream_clients") == 0)
        async with stream(inventory.url, {"Last-Event-ID": seen_id}, sku=sku) as events:
            _, _, first = await events.next()
            _, _, second = await events.next()
        assert (first["available"], first["status"]) == (0, "out_of_stock")
        assert (second["available"], second["cause"]) == (5, "adjustment")

        # The same position given as ?since= (clients that cannot set headers).
        async with stream(inventory.url, sku=sku, since=seen_id) as events:
            _, _, again = await events.next()
        assert again == first


async def test_a_stream_filtered_by_location_sees_only_that_location(omni_env, channel, ev) -> None:
    async with serving(omni_env) as inventory:
        a, b, sku = ev.uid("store-a"), ev.uid("store-b"), ev.uid("SKU")
        await _store(inventory, ev, a)
        await _store(inventory, ev, b)
        async with (
            stream(inventory.url, sku=sku, location_id=b) as only_b,
            stream(inventory.url, sku=sku) as every,
        ):
            await only_b.next()  # ready
            await every.next()
            for _ in range(3):
                await channel.publish(ev.receipt(a, sku, 1))
            await channel.publish(ev.receipt(b, sku, 3))
            _, _, data = await only_b.next()
            assert (data["location_id"], data["available"]) == (b, 3)
            seen = [await every.next() for _ in range(4)]
            assert [d["location_id"] for _, _, d in seen] == [a, a, a, b]
        assert inventory.metric("omni_inventory_stream_events_total") == 5


async def test_bad_positions_and_too_many_clients_are_refused(omni_env, ev) -> None:
    async with serving(omni_env, inventory_stream_max_clients=1) as inventory:
        async with httpx.AsyncClient(base_url=inventory.url, timeout=10) as anonymous:
            response = await anonymous.get(
                "/availability/stream", headers={"Last-Event-ID": "not-a-position"}
            )
            assert response.status_code == 400
            assert "partition:offset" in response.json()["detail"]
            async with stream(inventory.url) as first:
                await first.next()
                response = await anonymous.get("/availability/stream")
                assert response.status_code == 503
                assert response.headers["retry-after"] == "5"
        assert inventory.metric("omni_inventory_stream_dropped_clients_total", reason="full") == 1


async def test_heartbeats_keep_an_idle_stream_open(omni_env) -> None:
    async with (
        serving(omni_env, inventory_stream_heartbeat_s=0.2) as inventory,
        httpx.AsyncClient(base_url=inventory.url, timeout=10) as client,
        client.stream("GET", "/availability/stream") as response,
    ):
        seen: list[str] = []
        async with asyncio.timeout(5):
            async for line in response.aiter_lines():
                seen.append(line)
                if line.startswith(": keep-alive"):
                    break
        assert any(line.startswith("event: ready") for line in seen)
