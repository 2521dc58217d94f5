"""Every service's HTTP app serves the part of the contract it touches."""

from __future__ import annotations

from typing import Any

import httpx
import yaml
from omni_common.handlers import Subscription
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_contracts import INVENTORY_AVAILABILITY, STORE_SALES, SaleRecorded


async def _ignore(events: Any) -> None:
    return None


def _app() -> Any:
    runtime = ServiceRuntime(ServiceSettings(service_name="till-reader"))
    runtime.subscribe(Subscription(STORE_SALES, {SaleRecorded: _ignore}))
    runtime.publishes(INVENTORY_AVAILABILITY)
    return create_http_app(runtime, title="Till reader")


async def test_asyncapi_yaml_has_what_the_service_consumes_and_produces() -> None:
    transport = httpx.ASGITransport(app=_app())  # no lifespan: nothing connects
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        response = await client.get("/asyncapi.yaml")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/yaml")
    document = yaml.safe_load(response.text)
    assert document["asyncapi"] == "3.0.0"
    assert set(document["channels"]) == {
        "store.sales.v1",
        "store.sales.v1.dlq",
        "inventory.availability.v1",
    }
    actions = {
        op["channel"]["$ref"].rsplit("/", 1)[-1]: op["action"]
        for op in document["operations"].values()
    }
    assert actions == {
        "store.sales.v1": "receive",
        "store.sales.v1.dlq": "send",
        "inventory.availability.v1": "send",
    }
    schemas = document["components"]["schemas"]
    assert {"SaleRecorded", "Line", "Money", "AvailabilityChanged"} <= set(schemas)
    assert "CheckoutSubmitted" not in schemas  # only what this service touches


async def test_the_contract_page_is_readable_html() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        response = await client.get("/asyncapi")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<code>store.sale.recorded</code>" in page
    assert "<code>sale_id</code>" in page and "href='asyncapi.yaml'" in page
    assert "<script" not in page  # self-contained, works offline
