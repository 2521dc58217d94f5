"""The inventory HTTP API: authentication, validation, and what it answers."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

ENDPOINTS = [
    ("PUT", "/locations/store-1"),
    ("GET", "/locations"),
    ("GET", "/locations/store-1"),
    ("GET", "/availability/SKU-1"),
    ("GET", "/locations/store-1/availability"),
    ("GET", "/lost-demand"),
    ("GET", "/discrepancies"),
]


async def test_every_endpoint_needs_an_api_key(start_inventory, ev) -> None:
    async with start_inventory() as inventory:
        app = inventory.app
        documented = {
            (method.upper(), path)
            for path, operations in app.openapi()["paths"].items()
            for method in operations
        }
        # The availability stream is public on purpose (see entrypoints/stream.py).
        assert ("GET", "/availability/stream") in documented
        documented.discard(("GET", "/availability/stream"))
        assert documented == {
            (m, p.replace("store-1", "{location_id}").replace("SKU-1", "{sku}"))
            for m, p in ENDPOINTS
        }
        transport = httpx.ASGITransport(app=app)
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic eA=="}):
            async with httpx.AsyncClient(
                transport=transport, base_url="http://inventory", headers=headers
            ) as anonymous:
                for method, path in ENDPOINTS:
                    # A valid body, so only the missing key can be the reason.
                    response = await anonymous.request(method, path, json=ev.location_body())
                    assert response.status_code == 401, (method, path, headers)
                    assert response.headers["www-authenticate"] == "Bearer"
        assert (await inventory.http.get("/locations")).status_code == 200
        # Probes stay open for the orchestrator.
        async with httpx.AsyncClient(transport=transport, base_url="http://inventory") as probe:
            assert (await probe.get("/healthz")).status_code == 200
            assert (await probe.get("/readyz")).status_code == 200


BAD_BODIES = [
    {"kind": "store"},  # no name
    {"name": "X", "kind": "shop"},  # not store|warehouse
    {"name": "X", "kind": "store", "safety_stock": -1},
    {"name": "X", "kind": "store", "low_stock_threshold": -3},
    {"name": "X", "kind": "store", "ships_online": "sometimes"},
    {"name": "X", "kind": "store", "colour": "blue"},  # unknown field
    {"name": "", "kind": "store"},
    [],
]


async def test_a_bad_location_body_is_refused_with_422(start_inventory) -> None:
    async with start_inventory() as inventory:
        for bad in BAD_BODIES:
            response = await inventory.http.put("/locations/store-1", json=bad)
            assert response.status_code == 422, (bad, response.text)
        too_long = "x" * 201
        assert (await inventory.http.get(f"/availability/{too_long}")).status_code == 422
        assert (await inventory.http.get("/locations")).json() == []


async def test_locations_are_created_updated_listed_and_read(start_inventory, ev) -> None:
    async with start_inventory(inventory_low_stock_threshold=7) as inventory:
        http = inventory.http
        created = await http.put(
            "/locations/wh-1", json={"name": "Central", "kind": "warehouse", "ships_online": True}
        )
        assert created.status_code == 201
        assert created.json() == {
            "location_id": "wh-1",
            "name": "Central",
            "kind": "warehouse",
            "ships_online": True,
            "offers_pickup": False,
            "safety_stock": 0,
            "low_stock_threshold": 7,  # the service default
        }
        updated = await http.put("/locations/wh-1", json=ev.location_body("warehouse", name="Main"))
        assert (updated.status_code, updated.json()["name"]) == (200, "Main")
        await http.put("/locations/store-1", json=ev.location_body())
        assert [loc["location_id"] for loc in (await http.get("/locations")).json()] == [
            "store-1",
            "wh-1",
        ]
        assert (await http.get("/locations/wh-1")).json()["low_stock_threshold"] == 2
        assert (await http.get("/locations/nowhere")).status_code == 404
        assert (await http.get("/locations/nowhere/availability")).status_code == 404
        # A SKU never stocked is simply not available anywhere.
        assert (await http.get("/availability/UNKNOWN")).json() == {
            "sku": "UNKNOWN",
            "online_available": 0,
            "locations": [],
        }
        assert (await http.get("/lost-demand", params={"limit": 0})).status_code == 422


async def test_a_location_lists_its_stock_page_by_page(start_inventory, ev) -> None:
    async with start_inventory() as inventory:
        await inventory.http.put("/locations/store-1", json=ev.location_body(safety_stock=1))
        runtime = inventory.runtime
        from inventory_service.service import handlers
        from inventory_service.service.handlers import Inventory

        inv = Inventory(lock_namespace=runtime.settings.schema)
        async with runtime.transaction() as tx:
            for qty, sku in enumerate(("A", "B", "C"), start=1):
                await handlers.adjust_stock(inv, tx, ev.receipt("store-1", sku, qty))
        first = (
            await inventory.http.get("/locations/store-1/availability", params={"limit": 2})
        ).json()
        assert [(i["sku"], i["available"], i["status"]) for i in first["items"]] == [
            ("A", 1, "low_stock"),
            ("B", 2, "low_stock"),
        ]
        assert first["items"][1]["sellable_online"] == 1  # 2 less 1 safety stock
        rest = (
            await inventory.http.get(
                "/locations/store-1/availability", params={"limit": 2, "after": first["next_after"]}
            )
        ).json()
        assert [(i["sku"], i["status"]) for i in rest["items"]] == [("C", "in_stock")]
        assert rest["next_after"] is None
