"""Who may do what on the order API, against the real service, database and broker.

Keys of the real channels carry their default scopes (``TEST_CHANNEL_KEYS``); web and app
act for one shopper only, with that shopper's token.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from omni_devkit.testing.plugin import TEST_CHANNEL_KEYS, OmniTestEnv, isolated_env
from omni_devkit.testing.services import RunningService, running
from order_service.entrypoints.app import create_app

pytestmark = pytest.mark.integration

WEB = TEST_CHANNEL_KEYS["web"]
POS = TEST_CHANNEL_KEYS["pos"]
CALL_CENTER = TEST_CHANNEL_KEYS["call_center"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(
    kafka_bootstrap: str, postgres_url: str
) -> AsyncIterator[tuple[RunningService, OmniTestEnv]]:
    """The order service for this module and its test environment (for tokens)."""
    async with (
        isolated_env(kafka_bootstrap, postgres_url) as env,
        running(create_app(env.settings("order"))) as svc,
    ):
        yield svc, env


def _checkout(customer: str, qty: int = 1) -> dict[str, Any]:
    return {
        "checkout_id": f"chk-{uuid.uuid4().hex[:8]}",
        "customer_id": customer,
        "lines": [
            {"sku": "SKU-1", "qty": qty, "unit_price": {"amount": "5.00", "currency": "EUR"}}
        ],
        "fulfillment": {"type": "pickup", "location_id": "store-1"},
        "payment": {
            "reference": "pay-1",
            "authorized": {"amount": f"{5 * qty}.00", "currency": "EUR"},
        },
    }


def _as(key: str, token: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if token:
        headers["X-Shopper-Token"] = token
    return headers


async def _req(svc: RunningService, method: str, path: str, **kw: Any) -> httpx.Response:
    return await svc.http.request(method, path, **kw)


async def test_web_shoppers_reach_only_their_own_orders(api) -> None:
    svc, env = api
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    alice_token, bob_token = env.shopper_token(alice), env.shopper_token(bob)

    # Checkout: a token is needed, and it must be the checkout's shopper's.
    body = _checkout(alice)
    assert (await _req(svc, "POST", "/orders", json=body, headers=_as(WEB))).status_code == 401
    as_bob = await _req(svc, "POST", "/orders", json=body, headers=_as(WEB, bob_token))
    assert as_bob.status_code == 403
    posing = await _req(
        svc, "POST", "/orders", json={**body, "channel": "store"}, headers=_as(WEB, alice_token)
    )
    assert posing.status_code == 403
    placed = await _req(svc, "POST", "/orders", json=body, headers=_as(WEB, alice_token))
    assert placed.status_code == 201, placed.text
    assert placed.json()["channel"] == "web"  # the key's channel when the body names none
    order_id = placed.json()["order_id"]

    # Reading one order: the shopper's own, never another's (404, as if it did not exist).
    own = await _req(svc, "GET", f"/orders/{order_id}", headers=_as(WEB, alice_token))
    assert own.status_code == 200 and own.json()["customer_id"] == alice
    other = await _req(svc, "GET", f"/orders/{order_id}", headers=_as(WEB, bob_token))
    assert other.status_code == 404
    assert (await _req(svc, "GET", f"/orders/{order_id}", headers=_as(WEB))).status_code == 401

    # A history: one's own only.
    mine = await _req(svc, "GET", f"/customers/{alice}/orders", headers=_as(WEB, alice_token))
    assert [o["order_id"] for o in mine.json()["orders"]] == [order_id]
    theirs = await _req(svc, "GET", f"/customers/{alice}/orders", headers=_as(WEB, bob_token))
    assert theirs.status_code == 403

    # Cancelling: not someone else's; one's own, yes.
    refused = await _req(svc, "POST", f"/orders/{order_id}/cancel", headers=_as(WEB, bob_token))
    assert refused.status_code == 404
    cancelled = await _req(svc, "POST", f"/orders/{order_id}/cancel", headers=_as(WEB, alice_token))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


async def test_staff_channels_have_their_scopes_and_no_more(api) -> None:
    svc, env = api
    customer = f"carol-{uuid.uuid4().hex[:6]}"
    placed = await _req(
        svc, "POST", "/orders", json=_checkout(customer),
        headers=_as(WEB, env.shopper_token(customer)),
    )  # fmt: skip
    order_id = placed.json()["order_id"]

    # The till records store activity and reads stock: no shopper data, no cancelling.
    for method, path in [
        ("GET", f"/orders/{order_id}"),
        ("GET", f"/customers/{customer}/orders"),
        ("POST", f"/orders/{order_id}/cancel"),
        ("POST", "/orders"),
    ]:
        response = await _req(svc, method, path, headers=_as(POS), json=_checkout(customer))
        assert response.status_code == 403, (method, path, response.text)
        assert "lacks scope" in response.json()["detail"]

    # The call centre reads any shopper and cancels, but does not place orders.
    assert (await _req(svc, "GET", f"/orders/{order_id}", headers=_as(CALL_CENTER))).is_success
    history = await _req(svc, "GET", f"/customers/{customer}/orders", headers=_as(CALL_CENTER))
    assert history.json()["orders"][0]["order_id"] == order_id
    cancel = await _req(svc, "POST", f"/orders/{order_id}/cancel", headers=_as(CALL_CENTER))
    assert cancel.status_code == 200
    other = _checkout(customer)
    assert (
        await _req(svc, "POST", "/orders", json=other, headers=_as(CALL_CENTER))
    ).status_code == 403


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda b: b["lines"][0].update(qty=2**31), "quantity beyond int4"),
        (lambda b: b.update(customer_id="cust\x00evil"), "NUL"),
        (lambda b: b["lines"].extend([b["lines"][0]] * 100), "more than 100 lines"),
        (lambda b: b["lines"][0]["unit_price"].update(amount="1.001"), "sub-cent money"),
        (lambda b: b.update(points_to_redeem=2**31), "points beyond int4"),
        (lambda b: b["payment"].update(method="x" * 5000), "over-long string"),
    ],
)
async def test_what_no_column_could_hold_is_422(api, change, why: str) -> None:
    svc, _ = api
    body = _checkout(f"dave-{uuid.uuid4().hex[:6]}")
    change(body)
    response = await _req(svc, "POST", "/orders", json=body)
    assert response.status_code == 422, (why, response.status_code, response.text)


async def test_a_huge_body_is_refused_before_it_is_parsed(api) -> None:
    svc, _ = api
    body = _checkout("erin")
    body["padding"] = "x" * (svc.runtime.settings.http_max_body_bytes + 1)
    assert (await _req(svc, "POST", "/orders", json=body)).status_code == 413
