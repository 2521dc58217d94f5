"""An erasure leaves nothing behind: no table of any service, no dead letter of any DLQ.

All five services run, as in production, on one broker and one database (a schema each). A
shopper leaves every trace a shopper can: e-mail, phone, a push subscription, a name (the
delivery recipient), a device, a cart, an online order (confirmed, so notified), a till sale
with a loyalty card (points), and two messages naming them that end in DLQs (a malformed
checkout and an invalid contact update). Then the shopper asks to be forgotten the
documented way (``customer.erasure.requested``); once every service has taken the
``customer.profile.erased`` in, the operator runs ``omni dlq purge --customer ID``.

Then every table of every service's schema is searched as text (``tables_containing``) and
every record of every catalogue DLQ is read. The personal data (e-mail, phone in both forms,
name, street, push endpoint, loyalty card, device id) is nowhere. The customer id itself
is only where the design keeps it on purpose (``KEEPS_THE_ID`` says where and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from customer_profile_service.entrypoints.app import create_app as create_profile
from customer_profile_service.settings import ProfileSettings
from inventory_service.entrypoints.app import create_app as create_inventory
from loyalty_service.entrypoints.app import create_app as create_loyalty
from loyalty_service.settings import LoyaltySettings
from notification_service.entrypoints.app import create_app as create_notification
from omni_contracts import (
    CartItemAdded,
    CheckoutSubmitted,
    ContactDetailsUpdated,
    CustomerIdentified,
    ErasureRequested,
    PreferencesUpdated,
    SaleRecorded,
    StockAdjusted,
)
from omni_devkit.cli import app as omni_cli
from omni_devkit.dlq import catalogue_dlq_topics, read_dead_letters
from omni_devkit.testing.events import ChannelPublisher, ce_headers, record_headers
from omni_devkit.testing.pii import tables_containing
from omni_devkit.testing.plugin import OmniTestEnv
from omni_devkit.testing.push import PushEndpoint
from omni_devkit.testing.services import RunningService, running
from order_service.entrypoints.app import create_app as create_order
from typer.testing import CliRunner

pytestmark = pytest.mark.e2e

WAREHOUSE, STORE = "wh-erase", "store-erase"

# Where the raw customer id may stay after an erasure, by design, and why. Anything else
# holding it is a leak.
KEEPS_THE_ID: dict[str, dict[str, str]] = {
    # The opaque id is the erasure's own record: without it a late event (a till sale, a
    # login) would build the profile again (services/customer-profile/README.md, Erasure).
    "customer_profile": {"erasures": "the erasure record: late events must not rebuild"},
    # The account is pseudonymised (erased:<n>); the erased id keeps naming that account so
    # later events open no new one under it (services/loyalty/README.md, Profiles).
    "loyalty": {"erased_customers": "the erased id -> its pseudonymised account"},
    # The accounts keep the orders, their lines and amounts, under the customer id; the
    # delivery address (recipient, phone) goes (services/customer-profile/README.md).
    "order": {"orders": "the accounts keep orders (ids, lines, amounts)"},
    # Each message's record (channel, template, status) stays, its subject, body and
    # parameters dropped (services/notification/README.md, customer.profile.erased).
    "notification": {"notifications": "what was sent when, without subject, body or params"},
}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def money(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "EUR"}


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    until: Callable[[Any], bool] = bool,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if until(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, f"not reached in time: {value}"
        await asyncio.sleep(0.1)


def omni(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(omni_cli, list(args))
    return result.exit_code, result.output


async def test_an_erasure_leaves_no_trace_in_any_table_or_dlq(
    omni_env: OmniTestEnv, smtp_server: Any, vapid_keys: Any
) -> None:
    await erase_a_shopper_everywhere(omni_env, smtp_server, vapid_keys, purge=True)


async def erase_a_shopper_everywhere(
    env: OmniTestEnv, smtp: Any, vapid: Any, *, purge: bool
) -> None:
    customer, device, card = uid("cust"), uid("dev"), uid("card")
    email, phone, compact_phone = f"{customer}@mail.example", "+33 6 55 44 33 22", "+33655443322"
    name, street = "Eulalie Oubliée", "9 Impasse des Souvenirs"
    async with contextlib.AsyncExitStack() as stack:
        push = await stack.enter_async_context(PushEndpoint(vapid_public_key=vapid.public_key))
        services = await _start_all(stack, env, smtp, vapid)
        channel = await stack.enter_async_context(ChannelPublisher(env.bootstrap, env.prefix))
        profiles = await stack.enter_async_context(env.reader("customer.profile.v1"))
        lifecycle = await stack.enter_async_context(env.reader("order.lifecycle.v1"))
        outcomes = await stack.enter_async_context(env.reader("notification.dispatched.v1"))
        dlq_checkouts = await stack.enter_async_context(env.reader("checkout.submitted.v1.dlq"))
        dlq_signals = await stack.enter_async_context(env.reader("customer.signals.v1.dlq"))
        inventory, loyalty = services["inventory"], services["loyalty"]

        for location_id, body in (
            (WAREHOUSE, {"name": "Warehouse", "kind": "warehouse", "ships_online": True}),
            (STORE, {"name": "Store", "kind": "store", "offers_pickup": True}),
        ):
            response = await inventory.http.put(f"/locations/{location_id}", json=body)
            assert response.status_code in (200, 201), response.text
        await channel.publish(
            StockAdjusted(
                adjustment_id=uid("adj"),
                location_id=WAREHOUSE,
                sku="SKU-ERASE",
                kind="receipt",
                delta=5,
                occurred_at=datetime.now(UTC),
            )
        )

        # The shopper: a device, e-mail, phone, a browser's push subscription, consent.
        browser = push.subscribe()
        await channel.publish(CustomerIdentified(customer_id=customer, anonymous_id=device))
        await channel.publish(
            ContactDetailsUpdated(
                customer_id=customer,
                email=email,
                phone=phone,
                email_verified=True,
                push_subscription=browser,
            )
        )
        await channel.publish(
            PreferencesUpdated(
                customer_id=customer,
                preferences={"preferred_channel": "email", "consents": {"email": True}},
            )
        )
        # A cart left open, an online order delivered to their name, a till sale on a card.
        lines = [{"sku": "SKU-ERASE", "qty": 1, "unit_price": money("30.00")}]
        await channel.publish(
            CartItemAdded(
                cart_id=uid("cart"),
                channel="web",
                customer_id=customer,
                anonymous_id=device,
                items=[{"sku": "SKU-CART", "qty": 1, "unit_price": money("5.00")}],
                occurred_at=datetime.now(UTC),
            )
        )
        await channel.publish(
            CheckoutSubmitted(
                checkout_id=uid("chk"),
                customer_id=customer,
                channel="web",
                lines=lines,
                fulfillment={
                    "type": "delivery",
                    "address": {
                        "line1": street,
                        "city": "Nantes",
                        "postal_code": "44000",
                        "country": "FR",
                        "recipient": name,
                        "phone": phone,
                    },
                },
                payment={"reference": uid("pay"), "authorized": money("30.00")},
            )
        )
        await channel.publish(
            SaleRecorded(
                sale_id=uid("sale"),
                location_id=STORE,
                lines=[{"sku": "SKU-TILL", "qty": 2, "unit_price": money("10.00")}],
                occurred_at=datetime.now(UTC),
                customer_id=customer,
                loyalty_card=card,
            )
        )
        # Two messages naming the shopper that services must dead-letter.
        broken = {"customer_id": customer, "contact_email": email, "recipient": name}
        await channel.publish_raw(
            "checkout.submitted.v1",
            (json.dumps(broken) + ', "lines": [').encode(),  # not JSON
            key=customer,
            headers=ce_headers("checkout.submitted"),
        )
        await channel.publish_raw(
            "customer.signals.v1",
            # Invalid: a phone both set and cleared.
            json.dumps({"customer_id": customer, "phone": phone, "cleared": ["phone"]}).encode(),
            key=customer,
            headers=ce_headers("customer.contact.updated"),
        )

        # Everything arrived where it goes.
        await dlq_checkouts.next(lambda r: r.key == customer.encode(), timeout=30)
        await dlq_signals.next(lambda r: r.key == customer.encode(), timeout=30)
        await lifecycle.next(
            lambda r: (
                record_headers(r).get("ce_type") == "order.confirmed"
                and json.loads(r.value).get("customer_id") == customer
            ),
            timeout=30,
        )
        await outcomes.next(
            lambda r: (
                record_headers(r).get("ce_type") == "notification.sent"
                and json.loads(r.value).get("customer_id") == customer
            ),
            timeout=30,
        )
        await eventually(
            lambda: loyalty.http.get(f"/accounts/{customer}"),
            lambda r: r.status_code == 200 and r.json()["lifetime"] + r.json()["pending"] > 0,
        )
        before = await _leftovers(services, [customer, email, name])
        assert {"customer_profile", "order", "notification", "loyalty"} <= set(before), before

        # The erasure, the documented way, until every service has taken it in.
        await channel.publish(ErasureRequested(customer_id=customer, request_id=uid("gdpr")))
        erased = await profiles.next(
            lambda r: (
                r.key == customer.encode()
                and record_headers(r).get("ce_type") == "customer.profile.erased"
            ),
            timeout=30,
        )
        erased_id = record_headers(erased)["ce_id"]
        for name_ in ("order", "notification", "loyalty"):
            await eventually(lambda s=services[name_]: _in_inbox(s, erased_id))
        await asyncio.sleep(1.0)  # the relays publish (and mark) what the erasure emitted

        if purge:  # the operator's step after an erasure (README, Dead letters)
            code, out = await asyncio.to_thread(
                omni,
                *("dlq", "purge", "--customer", customer),
                *("--bootstrap", env.bootstrap, "--prefix", env.prefix),
            )
            assert code == 0, out
            # The malformed checkout twice (order and customer-profile both consume
            # checkout.submitted.v1), the contact update once.
            last = out.strip().splitlines()[-1]
            assert last == f"3 dead letters naming {customer} removed from 2 topics", out

        personal = [email, phone, compact_phone, name, street, browser["endpoint"], card, device]
        left = await _leftovers(services, personal)
        assert left == {}, f"personal data left in tables: {left}"
        holding_id = await _leftovers(services, [customer])
        allowed = {schema: set(tables) for schema, tables in KEEPS_THE_ID.items()}
        unexpected = {
            schema: sorted(set(tables) - allowed.get(schema, set()))
            for schema, tables in holding_id.items()
            if set(tables) - allowed.get(schema, set())
        }
        assert unexpected == {}, f"the customer id left outside {KEEPS_THE_ID}: {unexpected}"

        in_dlqs = await _dead_letters_holding(env, [customer, *personal])
        assert in_dlqs == [], f"dead letters still naming the shopper: {in_dlqs}"


async def _start_all(
    stack: contextlib.AsyncExitStack, env: OmniTestEnv, smtp: Any, vapid: Any
) -> dict[str, RunningService]:
    apps = {
        "inventory": create_inventory(env.settings("inventory")),
        "order": create_order(env.settings("order")),
        "customer-profile": create_profile(
            ProfileSettings.from_settings(
                env.settings("customer-profile"),
                cart_abandonment_delay=timedelta(seconds=1),
                cart_timer_poll_s=0.1,
            )
        ),
        "notification": create_notification(
            env.settings("notification"),
            smtp_url=smtp.url,
            vapid_private_key_file=str(vapid.private_key_file),
            unsubscribe_secret="an-e2e-secret-of-enough-length",
            notify_push_private_endpoints="allow",  # the push service is on loopback
            notify_dispatch_poll_s=0.1,
            notify_timer_poll_s=0.1,
        ),
        "loyalty": create_loyalty(
            LoyaltySettings.from_settings(env.settings("loyalty"), loyalty_timer_poll_s=0.1)
        ),
    }
    return {name: await stack.enter_async_context(running(a)) for name, a in apps.items()}


async def _in_inbox(service: RunningService, ce_id: str) -> bool:
    async with service.runtime.pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT 1 FROM inbox WHERE ce_id = $1", ce_id))


async def _leftovers(
    services: dict[str, RunningService], needles: list[str]
) -> dict[str, dict[str, str]]:
    """schema -> {table: needle found} over every service's schema."""
    found: dict[str, dict[str, str]] = {}
    for service in services.values():
        schema = service.runtime.settings.schema
        async with service.runtime.pool.acquire() as conn:
            if hits := await tables_containing(conn, schema, needles):
                found[schema] = hits
    return found


async def _dead_letters_holding(env: OmniTestEnv, needles: list[str]) -> list[str]:
    """``topic partition:offset (needle)`` of every record of every DLQ holding a needle."""
    holding = []
    for topic in catalogue_dlq_topics(env.prefix):
        for letter in await read_dead_letters(env.bootstrap, topic):
            text = " ".join(
                [
                    (letter.key or b"").decode(errors="replace"),
                    letter.value.decode(errors="replace"),
                    *(v.decode(errors="replace") for _, v in letter.headers),
                ]
            )
            if hit := next((n for n in needles if n in text), None):
                holding.append(f"{topic} {letter.ref} ({hit})")
    return holding
