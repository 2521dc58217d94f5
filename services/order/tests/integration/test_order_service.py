"""The order service against the real broker and PostgreSQL (inventory played by the test).

The test publishes what channels and inventory would publish and reads ``order.lifecycle.v1``
as channels would. The service starts once for the module (each subscriber takes about a
second to join on Tansu); tests stay independent through their own ids.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import ConsumerRecord
from omni_contracts import (
    CheckoutSubmitted,
    Delivered,
    EtaChanged,
    OrderCancellationRequested,
    PointsHeld,
    PointsRefused,
    ReadyForPickup,
    ReservationConfirmed,
    ReservationRejected,
    ReservationReleased,
    ReturnReceived,
    SaleRecorded,
    Shipped,
)
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.plugin import TopicReader, isolated_env
from omni_devkit.testing.services import RunningService, running
from order_service.entrypoints.app import create_app
from order_service.settings import OrderSettings

pytestmark = pytest.mark.integration

LIFECYCLE = "order.lifecycle.v1"


# -- the module's world ------------------------------------------------------------------------


@dataclass
class World:
    """The running order service, a channel publisher and a reader of order.lifecycle.v1."""

    svc: RunningService
    channel: ChannelPublisher
    lifecycle: TopicReader
    reader: Callable[[str], TopicReader]

    async def event(self, order_id: str, ce_type: str, wait_s: float = 15) -> dict[str, Any]:
        """The next ``ce_type`` event of ``order_id`` on order.lifecycle.v1."""
        record = await self.lifecycle.next(_match(order_id, ce_type), timeout=wait_s)
        return json.loads(record.value)

    async def none(self, order_id: str, ce_type: str, wait_s: float = 1.5) -> None:
        """Assert that no (further) ``ce_type`` event of ``order_id`` comes."""
        found = await self.lifecycle.collect(1, wait_s, _match(order_id, ce_type))
        assert found == [], f"unexpected {ce_type} for {order_id}"

    async def place(self, body: dict[str, Any]) -> str:
        """Publish a checkout; return the order id of its order.placed."""
        await self.channel.publish(CheckoutSubmitted(**body))
        record = await self.lifecycle.next(
            lambda r: (
                _type(r) == "order.placed"
                and json.loads(r.value).get("checkout_id") == body["checkout_id"]
            ),
            timeout=20,
        )
        return json.loads(record.value)["order_id"]

    async def confirm(self, order_id: str, qty: int = 2) -> dict[str, Any]:
        """Answer as inventory would: reserved at wh-1."""
        await self.channel.publish(
            ReservationConfirmed(
                order_id=order_id,
                allocations=[{"sku": "SKU-1", "location_id": "wh-1", "qty": qty}],
                expires_at=datetime.now(UTC) + timedelta(minutes=15),
            )
        )
        return await self.event(order_id, "order.confirmed")

    async def ship(self, order_id: str, promised_by: datetime) -> dict[str, Any]:
        """Hand the order to a carrier."""
        await self.channel.publish(
            Shipped(order_id=order_id, carrier="dhl", tracking_id="T1", promised_by=promised_by)
        )
        return await self.event(order_id, "order.shipped")

    async def order(self, order_id: str) -> dict[str, Any]:
        """GET /orders/{order_id}."""
        response = await self.svc.http.get(f"/orders/{order_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the service's metrics registry (0 when absent)."""
        registry = self.svc.runtime.metrics.registry
        return registry.get_sample_value(name, {"service": "order", **labels}) or 0.0

    async def metric_reaches(
        self, name: str, value: float, wait_s: float = 3.0, **labels: str
    ) -> float:
        """The metric once it reaches ``value`` (or its last sample after ``wait_s``)."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while (sample := self.metric(name, **labels)) < value:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        return sample


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def w(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[World]:
    """The order service running for this module, a channel and a lifecycle reader."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env:
        settings = OrderSettings.from_settings(env.settings("order"), timer_poll_interval_s=0.1)
        async with (
            running(create_app(settings)) as svc,
            ChannelPublisher(env.bootstrap, env.prefix) as channel,
            env.reader(LIFECYCLE) as lifecycle,
        ):
            yield World(svc, channel, lifecycle, env.reader)


def _type(record: ConsumerRecord) -> str:
    return record_headers(record)["ce_type"]


def _match(order_id: str, ce_type: str) -> Callable[[ConsumerRecord], bool]:
    return lambda r: r.key == order_id.encode() and _type(r) == ce_type


def money(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "EUR"}


def checkout_body(
    customer: str | None = None, *, pickup: str | None = None, qty: int = 2
) -> dict[str, Any]:
    """A valid checkout of ``qty`` x SKU-1 at 10.00, for delivery unless ``pickup``."""
    fulfillment = (
        {"type": "pickup", "location_id": pickup}
        if pickup
        else {
            "type": "delivery",
            "address": {
                "line1": "1 Rue Neuve",
                "city": "Lyon",
                "postal_code": "69001",
                "country": "FR",
            },
        }
    )
    return {
        "checkout_id": f"chk-{uuid.uuid4().hex[:8]}",
        "customer_id": customer or f"cust-{uuid.uuid4().hex[:8]}",
        "channel": "web",
        "lines": [{"sku": "SKU-1", "qty": qty, "unit_price": money("10.00")}],
        "fulfillment": fulfillment,
        "payment": {"reference": "pay-1", "authorized": money(f"{10 * qty}.00")},
    }


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.tansu
async def test_a_checkout_is_placed_then_confirmed_or_rejected(w: World) -> None:
    body = checkout_body()
    order_id = await w.place(body)
    placed = await w.order(order_id)
    assert placed["status"] == "placed" and placed["pending_confirmations"] == ["inventory"]

    confirmed = await w.confirm(order_id)
    assert confirmed["status"] == "confirmed"
    assert confirmed["customer_id"] == body["customer_id"] and confirmed["channel"] == "web"
    assert confirmed["allocations"] == [{"sku": "SKU-1", "location_id": "wh-1", "qty": 2}]
    view = await w.order(order_id)
    assert view["status"] == "confirmed" and view["allocations"][0]["location_id"] == "wh-1"
    assert [h["event"] for h in view["history"]] == ["order.placed", "order.confirmed"]

    rejected_before = w.metric("omni_order_transitions_total", to_status="rejected", channel="web")
    other = await w.place(checkout_body())
    await w.channel.publish(
        ReservationRejected(
            order_id=other,
            reason="insufficient_stock",
            shortages=[{"sku": "SKU-1", "requested": 2, "available": 1}],
        )
    )
    rejected = await w.event(other, "order.rejected")
    assert rejected["reason"] == "insufficient_stock"
    assert rejected["shortages"] == [{"sku": "SKU-1", "requested": 2, "available": 1}]
    # Counted once the handler's transaction committed, which can be a moment after the
    # relay published the event.
    after = await w.metric_reaches(
        "omni_order_transitions_total", rejected_before + 1, to_status="rejected", channel="web"
    )
    assert after == rejected_before + 1

    # An expired reservation of a confirmed order: no longer backed by stock, cancelled.
    await w.channel.publish(ReservationReleased(order_id=order_id, reason="expired"))
    assert (await w.event(order_id, "order.cancelled"))["reason"] == "reservation_expired"

    assert (await w.svc.http.get("/orders/nope")).status_code == 404
    anonymous = await w.svc.http.get(f"/orders/{order_id}", headers={"Authorization": ""})
    assert anonymous.status_code == 401


async def test_the_same_checkout_on_the_topic_and_over_http_is_one_order(w: World) -> None:
    body = checkout_body()
    order_id = await w.place(body)
    # The web site retries over HTTP with the same key: the same order, no second one.
    again = await w.svc.http.post(
        "/orders",
        json={k: v for k, v in body.items() if k != "checkout_id"},
        headers={"Idempotency-Key": body["checkout_id"]},
    )
    assert again.status_code == 200, again.text
    assert again.json()["order_id"] == order_id
    # The same key with another basket is refused.
    changed = {**body, "lines": [{"sku": "SKU-2", "qty": 1, "unit_price": money("20.00")}]}
    conflict = await w.svc.http.post("/orders", json=changed)
    assert conflict.status_code == 409
    assert conflict.json()["detail"]["reason"] == "idempotency_conflict"
    # Over the topic, the checkout sent again has no second effect.
    await w.channel.publish(CheckoutSubmitted(**body))
    await w.none(order_id, "order.placed")
    count = "SELECT count(*) FROM orders WHERE checkout_id = $1"
    assert await w.svc.runtime.pool.fetchval(count, body["checkout_id"]) == 1

    # HTTP first (201), then the same again (200, same body).
    fresh = checkout_body()
    first = await w.svc.http.post("/orders", json=fresh)
    second = await w.svc.http.post("/orders", json=fresh)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json() == second.json()
    assert first.headers["location"] == f"/orders/{first.json()['order_id']}"
    await w.event(first.json()["order_id"], "order.placed")
    # Five concurrent retries of one checkout: one order, created once.
    racing = checkout_body()
    answers = await asyncio.gather(*(w.svc.http.post("/orders", json=racing) for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 200, 201]
    assert len({a.json()["order_id"] for a in answers}) == 1
    # A payment that does not cover the basket is not an order.
    short = {**checkout_body(), "payment": {"reference": "p", "authorized": money("1.00")}}
    refused = await w.svc.http.post("/orders", json=short)
    assert refused.status_code == 422 and refused.json()["detail"]["reason"] == "invalid_order"


async def test_store_sales_are_completed_orders_in_one_history_newest_first(w: World) -> None:
    customer = f"cust-{uuid.uuid4().hex[:8]}"
    base = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    sales = [f"sale-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for day, sale_id in enumerate(sales):
        await w.channel.publish(
            SaleRecorded(
                sale_id=sale_id,
                location_id="store-1",
                customer_id=customer,
                lines=[{"sku": "SKU-1", "qty": 1, "unit_price": money("4.00")}],
                occurred_at=base + timedelta(days=day),
            )
        )
    anonymous = SaleRecorded(
        sale_id=f"sale-{uuid.uuid4().hex[:8]}",
        location_id="store-1",
        lines=[{"sku": "SKU-1", "qty": 1, "unit_price": money("4.00")}],
        occurred_at=base,
    )
    await w.channel.publish(anonymous)
    await w.channel.publish(anonymous)  # the till sent it twice (new ce_id): one order
    web_id = await w.place(checkout_body(customer))

    def a_sale(record: ConsumerRecord) -> bool:
        sale_id = json.loads(record.value).get("sale_id")
        return _type(record) == "order.placed" and sale_id in {*sales, anonymous.sale_id}

    events = [json.loads(r.value) for r in await w.lifecycle.collect(4, 20, a_sale)]
    assert len(events) == 4
    assert {e["status"] for e in events} == {"completed"}
    assert {e["channel"] for e in events} == {"store"}
    assert {e["fulfillment"]["location_id"] for e in events} == {"store-1"}
    anon = next(e for e in events if e["sale_id"] == anonymous.sale_id)
    assert "customer_id" in anon and anon["customer_id"] is None
    assert await w.lifecycle.collect(1, 1.5, a_sale) == []

    path = f"/customers/{customer}/orders"
    first = (await w.svc.http.get(path, params={"limit": 2})).json()
    assert first["orders"][0]["order_id"] == web_id  # newest: placed just now
    assert first["orders"][1]["sale_id"] == sales[2]
    second = await w.svc.http.get(path, params={"limit": 2, "cursor": first["next_cursor"]})
    page = second.json()
    assert [o["sale_id"] for o in page["orders"]] == [sales[1], sales[0]]
    assert page["next_cursor"] is None
    assert all(o["channel"] == "store" and o["status"] == "completed" for o in page["orders"])
    assert (await w.svc.http.get(path, params={"cursor": "zzz"})).status_code == 400


async def test_cancel_before_shipping_and_refused_after(w: World) -> None:
    body = checkout_body()
    order_id = await w.place(body)
    await w.confirm(order_id)
    response = await w.svc.http.post(f"/orders/{order_id}/cancel", json={"reason": "oops"})
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    cancelled = await w.event(order_id, "order.cancelled")
    assert cancelled["reason"] == "oops" and cancelled["customer_id"] == body["customer_id"]
    again = await w.svc.http.post(f"/orders/{order_id}/cancel")
    assert again.status_code == 200  # harmless repeat
    await w.none(order_id, "order.cancelled")

    illegal_before = w.metric("omni_order_illegal_transitions_total")
    shipped_id = await w.place(checkout_body())
    await w.confirm(shipped_id)
    await w.ship(shipped_id, datetime.now(UTC) + timedelta(days=2))
    refused = await w.svc.http.post(f"/orders/{shipped_id}/cancel")
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert (detail["reason"], detail["status"]) == ("illegal_transition", "shipped")
    # The same request on the topic: refused, counted and noted, never dead-lettered.
    await w.channel.publish(
        OrderCancellationRequested(order_id=shipped_id, channel="app", reason="too late")
    )
    await w.none(shipped_id, "order.cancelled")
    view = await w.order(shipped_id)
    assert view["status"] == "shipped"
    assert view["history"][-1]["event"] == "cancellation_refused"
    assert await w.metric_reaches("omni_order_illegal_transitions_total", illegal_before + 2) == (
        illegal_before + 2
    )


async def test_a_carrier_eta_past_the_promise_is_one_order_delayed(w: World) -> None:
    order_id = await w.place(checkout_body())
    await w.confirm(order_id)
    promise = datetime.now(UTC) + timedelta(days=2)
    await w.ship(order_id, promise)
    late = EtaChanged(order_id=order_id, eta=promise + timedelta(days=1))
    await w.channel.publish(EtaChanged(order_id=order_id, eta=promise - timedelta(hours=2)))
    await w.channel.publish(late)
    await w.channel.publish(EtaChanged(order_id=order_id, eta=late.eta))  # the carrier repeats
    delayed = await w.event(order_id, "order.delayed")
    assert delayed["status"] == "shipped"
    assert datetime.fromisoformat(delayed["eta"]) == late.eta
    assert datetime.fromisoformat(delayed["promised_by"]) == promise
    await w.none(order_id, "order.delayed", wait_s=2)
    await w.channel.publish(Delivered(order_id=order_id))
    await w.event(order_id, "order.delivered")


async def test_a_promise_passing_without_delivery_is_announced_by_its_timer(w: World) -> None:
    order_id = await w.place(checkout_body())
    await w.confirm(order_id)
    promise = datetime.now(UTC) + timedelta(seconds=1)
    await w.ship(order_id, promise)
    delayed = await w.event(order_id, "order.delayed")
    # the estimate: a day after the promise (or after now, the timer fires a little late)
    eta = datetime.fromisoformat(delayed["eta"])
    assert promise + timedelta(hours=24) <= eta < promise + timedelta(hours=24, minutes=1)
    await w.none(order_id, "order.delayed")


async def test_a_pickup_not_collected_in_time_is_cancelled(w: World) -> None:
    order_id = await w.place(checkout_body(pickup="store-1"))
    await w.confirm(order_id)
    collect_by = datetime.now(UTC) + timedelta(seconds=1)
    await w.channel.publish(
        ReadyForPickup(order_id=order_id, location_id="store-1", collect_by=collect_by)
    )
    ready = await w.event(order_id, "order.ready_for_pickup")
    assert ready["location_id"] == "store-1"
    assert datetime.fromisoformat(ready["collect_by"]) == collect_by
    cancelled = await w.event(order_id, "order.cancelled")
    assert cancelled["reason"] == "not_collected"


async def test_a_return_is_received_where_handed_in_and_refunded_once(w: World) -> None:
    order_id = await w.place(checkout_body(qty=3))
    await w.confirm(order_id, qty=3)
    await w.ship(order_id, datetime.now(UTC) + timedelta(days=1))
    await w.channel.publish(Delivered(order_id=order_id))
    await w.event(order_id, "order.delivered")
    back = ReturnReceived(
        return_id=f"ret-{uuid.uuid4().hex[:8]}",
        order_id=order_id,
        location_id="store-5",
        channel="store",
        lines=[{"sku": "SKU-1", "qty": 1, "resellable": True}],
        occurred_at=datetime.now(UTC),
    )
    await w.channel.publish(back)
    await w.channel.publish(back)  # scanned twice by the till (a new ce_id): one effect
    received = await w.event(order_id, "order.return_received")
    assert received["location_id"] == "store-5" and received["status"] == "partially_returned"
    lines = [{k: v for k, v in line.items() if v is not None} for line in received["lines"]]
    assert lines == [{"sku": "SKU-1", "qty": 1, "resellable": True}]
    refund = await w.event(order_id, "order.refund_issued")
    assert refund["amount"] == money("10.00") and refund["return_id"] == back.return_id
    await w.none(order_id, "order.refund_issued")
    view = await w.order(order_id)
    assert view["refunded"] == money("10.00") and view["lines"][0]["returned_qty"] == 1
    assert [r["return_id"] for r in view["returns"]] == [back.return_id]


@pytest.mark.tansu
async def test_illegal_and_unknown_fulfilment_events_are_dead_lettered(w: World) -> None:
    illegal_before = w.metric("omni_order_illegal_transitions_total")
    order_id = await w.place(checkout_body())
    async with w.reader("fulfillment.events.v1.dlq") as dlq:
        await w.channel.publish(Delivered(order_id=order_id))  # never confirmed nor shipped
        await w.channel.publish(Delivered(order_id=f"no-such-{order_id}"))
        dead = await dlq.collect(2, timeout=15)
    # (different keys, different partitions: in no particular order)
    assert sorted(record_headers(r)["dlq_reason"] for r in dead) == [
        "illegal_transition",
        "unknown_order",
    ]
    assert await w.metric_reaches("omni_order_illegal_transitions_total", illegal_before + 1) == (
        illegal_before + 1
    )
    assert (await w.order(order_id))["status"] == "placed"
    exposition = (await w.svc.metrics.get("/metrics")).text
    assert 'omni_order_transitions_total{channel="web",service="order",to_status="placed"}' in (
        exposition
    )
    assert "omni_orders_by_status" in exposition


async def test_points_pay_the_rest_only_when_loyalty_holds_enough_of_them(w: World) -> None:
    """Loyalty played by the test: its yes carries the held points' value."""

    async def placed_with_points(points: int) -> tuple[str, dict[str, Any]]:
        body = checkout_body()  # 20.00 due
        body["payment"]["authorized"] = money("5.00")
        body["points_to_redeem"] = points
        order_id = await w.place(body)
        view = await w.order(order_id)
        assert sorted(view["pending_confirmations"]) == ["inventory", "loyalty"]
        return order_id, body

    # 1500 points worth 15.00 + 5.00 paid cover 20.00: confirmed once both said yes.
    order_id, body = await placed_with_points(1500)
    await w.channel.publish(
        PointsHeld(
            customer_id=body["customer_id"],
            points=-1500,
            balance=0,
            reason="checkout",
            order_id=order_id,
            value=money("15.00"),
        )
    )
    assert (await w.confirm(order_id))["status"] == "confirmed"
    assert Decimal((await w.order(order_id))["paid"]["amount"]) == Decimal("5.00")

    # Points worth 10.00 leave 5.00 uncovered: rejected, whatever inventory says.
    order_id, body = await placed_with_points(1000)
    await w.channel.publish(
        PointsHeld(
            customer_id=body["customer_id"],
            points=-1000,
            balance=0,
            reason="checkout",
            order_id=order_id,
            value=money("10.00"),
        )
    )
    rejected = await w.event(order_id, "order.rejected")
    assert rejected["reason"] == "payment_insufficient" and rejected["participant"] == "loyalty"

    # Loyalty refuses: rejected with its reason.
    order_id, body = await placed_with_points(500)
    await w.channel.publish(
        PointsRefused(
            customer_id=body["customer_id"],
            balance=20,
            reason="insufficient_points",
            requested=500,
            order_id=order_id,
        )
    )
    assert (await w.event(order_id, "order.rejected"))["reason"] == "insufficient_points"


async def test_points_do_not_pay_when_loyalty_is_not_in_the_saga(
    kafka_bootstrap: str, postgres_url: str
) -> None:
    """Without loyalty holding them, redeemed points cover nothing: the payment must."""
    async with isolated_env(kafka_bootstrap, postgres_url) as env:
        settings = OrderSettings.from_settings(env.settings("order"), loyalty_in_saga=False)
        async with running(create_app(settings)) as svc:
            body = checkout_body()
            body["payment"]["authorized"] = money("5.00")  # 20.00 due
            body["points_to_redeem"] = 1500
            response = await svc.http.post(
                "/orders", json=body, headers={"Idempotency-Key": body["checkout_id"]}
            )
            assert response.status_code == 422, response.text
            assert "does not cover" in response.text
            paid = checkout_body()
            paid["points_to_redeem"] = 1500
            created = await svc.http.post(
                "/orders", json=paid, headers={"Idempotency-Key": paid["checkout_id"]}
            )
            assert created.status_code == 201, created.text
            assert created.json()["pending_confirmations"] == ["inventory"]


async def test_an_erasure_takes_the_address_out_of_events_not_yet_published(w: World) -> None:
    from order_service.adapters.repository import OrderRepository

    customer, street = f"cust-{uuid.uuid4().hex[:8]}", "17 Rue des Secrets"
    payload = {
        "order_id": f"ord-{uuid.uuid4().hex[:8]}",
        "customer_id": customer,
        "fulfillment": {"type": "delivery", "address": {"line1": street, "city": "Lyon"}},
    }

    class Rollback(Exception):
        pass

    kept: dict[str, Any] = {}
    with pytest.raises(Rollback):  # nothing committed: the relay never sees the row
        async with w.svc.runtime.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO outbox (ce_id, ce_type, topic, key, headers, payload)"
                " VALUES ($1, 'order.placed', 'order.lifecycle.v1', $2, '{}', $3)",
                uuid.uuid4(),
                payload["order_id"],
                json.dumps(payload).encode(),
            )
            await OrderRepository(conn).erase_customer(customer)
            raw = await conn.fetchval(
                "SELECT payload FROM outbox WHERE key = $1 AND published_at IS NULL",
                payload["order_id"],
            )
            kept.update(json.loads(raw))
            raise Rollback
    # The event still goes out (nothing is lost), without the address.
    assert kept["fulfillment"] == {"type": "delivery"} and street not in json.dumps(kept)
