"""Each channel's key does only its channel's job on the inventory API."""

from __future__ import annotations

import pytest
from omni_devkit.testing.plugin import TEST_CHANNEL_KEYS

pytestmark = pytest.mark.integration

READS = [
    ("GET", "/locations"),
    ("GET", "/locations/store-1"),
    ("GET", "/availability/SKU-1"),
    ("GET", "/locations/store-1/availability"),
]
REPORTS = [("GET", "/lost-demand"), ("GET", "/discrepancies")]
WRITE = ("PUT", "/locations/store-1")

# channel -> what it may do (reads, reports, location writes)
MAY = {
    "web": (True, False, False),
    "app": (True, False, False),
    "pos": (True, False, False),
    "call_center": (True, False, False),
}


async def test_only_operators_change_locations_and_read_reports(start_inventory, ev) -> None:
    async with start_inventory() as inventory:
        created = await inventory.http.put("/locations/store-1", json=ev.location_body())
        assert created.status_code == 201  # the test key administers
        for channel, (reads, reports, writes) in MAY.items():
            headers = {"Authorization": f"Bearer {TEST_CHANNEL_KEYS[channel]}"}
            for group, allowed in ((READS, reads), (REPORTS, reports), ([WRITE], writes)):
                for method, path in group:
                    response = await inventory.http.request(
                        method, path, headers=headers, json=ev.location_body()
                    )
                    if allowed:
                        assert response.status_code == 200, (channel, path, response.text)
                    else:
                        assert response.status_code == 403, (channel, path, response.text)
                        assert response.json()["detail"].startswith(f"the {channel} key lacks")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "X", "kind": "store", "safety_stock": 2**31},
        {"name": "X", "kind": "store", "safety_stock": 1_000_001},
        {"name": "X", "kind": "store", "low_stock_threshold": 2**40},
        {"name": "X\x00Y", "kind": "store"},
    ],
)
async def test_out_of_bounds_locations_are_422(start_inventory, body) -> None:
    async with start_inventory() as inventory:
        response = await inventory.http.put("/locations/store-1", json=body)
        assert response.status_code == 422, response.text
        nul_path = await inventory.http.get("/availability/SKU%00X")
        assert nul_path.status_code == 422
        nul_after = await inventory.http.get("/locations/store-1/availability?after=%00")
        assert nul_after.status_code == 422
