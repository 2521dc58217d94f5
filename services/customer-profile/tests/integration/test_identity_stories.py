"""The issue's stories as a channel team would try them, against the real broker and PostgreSQL.

1. A sign-up the natural way (contact and preferences first, no login) is not dead-lettered.
2. Typing someone else's e-mail (unverified) neither merges nor finds their profile.
3. A merge keeps the most restrictive consent.
4. Push devices are bounded, and a device found gone is removed at the profile.
Plus: a merge is undone on request, each side getting back its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from customer_profile_service.entrypoints.app import create_app
from customer_profile_service.settings import ProfileSettings
from omni_contracts import (
    ContactDetailsUpdated,
    CustomerIdentified,
    PreferencesUpdated,
    PushAddressesGone,
    UnmergeRequested,
)
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.plugin import TopicReader, isolated_env
from omni_devkit.testing.services import RunningService, running

pytestmark = pytest.mark.integration


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Stack:
    def __init__(self, svc: RunningService, channel: ChannelPublisher, profile: TopicReader):
        self.svc, self.channel, self.profile = svc, channel, profile

    async def event(self, key: str, ce_type: str = "customer.profile.updated") -> dict[str, Any]:
        record = await self.profile.next(
            lambda r: r.key == key.encode() and record_headers(r).get("ce_type") == ce_type,
            timeout=15,
        )
        return json.loads(record.value)

    async def view(self, customer_id: str) -> dict[str, Any]:
        response = await self.svc.http.get(f"/customers/{customer_id}")
        assert response.status_code == 200, response.text
        return response.json()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def s(kafka_bootstrap: str, postgres_url: str) -> AsyncIterator[Stack]:
    async with isolated_env(kafka_bootstrap, postgres_url) as env:
        settings = ProfileSettings.from_settings(
            env.settings("customer-profile"), profile_max_push_devices=2
        )
        async with (
            running(create_app(settings)) as svc,
            ChannelPublisher(env.bootstrap, env.prefix) as channel,
            env.reader("customer.profile.v1") as profile,
        ):
            yield Stack(svc, channel, profile)


async def test_1_a_sign_up_without_login_starts_the_profile(s: Stack) -> None:
    customer = uid("cust")
    await s.channel.publish(ContactDetailsUpdated(customer_id=customer, email=f"{customer}@x.io"))
    await s.channel.publish(
        PreferencesUpdated(
            customer_id=customer,
            preferences={
                "preferred_channel": "email",
                "consents": {"email": True},
                "time_zone": "Europe/Paris",
                "quiet_hours_start": "22:00",
                "quiet_hours_end": "07:00",
            },
        )
    )
    await s.event(customer)

    async def done() -> dict[str, Any]:
        view = await s.view(customer)
        return view if view["preferences"]["quiet_hours_end"] else {}

    for _ in range(100):
        if view := await done():
            break
        await _sleep()
    assert view["contact"]["email"] == f"{customer}@x.io"
    assert view["preferences"]["consents"]["email"] is True


async def test_2_an_unverified_email_never_merges_nor_looks_up(s: Stack) -> None:
    victim, attacker = uid("v"), uid("a")
    email = f"{victim}@x.io"
    await s.channel.publish(
        ContactDetailsUpdated(customer_id=victim, email=email, email_verified=True)
    )
    await s.event(victim)
    await s.channel.publish(ContactDetailsUpdated(customer_id=attacker, email=email))
    snapshot = await s.event(attacker)
    assert snapshot["email"] == email  # kept as the contact, not as proof
    view = await s.view(attacker)
    assert view["customer_id"] == attacker and view["merged_ids"] == []
    found = await s.svc.http.get("/customers/lookup", params={"email": email})
    assert found.json()["customer_id"] == victim
    assert (await s.view(victim))["merged_ids"] == []


async def test_3_and_unmerge_a_merge_keeps_the_strictest_consent_and_can_be_undone(
    s: Stack,
) -> None:
    older, newer = uid("o"), uid("n")
    phone = "+3361" + str(uuid.uuid4().int)[:7]
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    await s.channel.publish(
        CustomerIdentified(customer_id=older, anonymous_id=uid("d"), occurred_at=t0)
    )
    await s.channel.publish(
        PreferencesUpdated(customer_id=older, preferences={"consents": {"email": True}})
    )
    await s.event(older)
    await s.channel.publish(
        PreferencesUpdated(customer_id=newer, preferences={"consents": {"email": False}})
    )
    await s.channel.publish(
        ContactDetailsUpdated(
            customer_id=newer, email=f"{newer}@x.io", phone=phone, phone_verified=True
        )
    )
    await s.event(newer)
    await s.channel.publish(
        ContactDetailsUpdated(customer_id=older, phone=phone, phone_verified=True)
    )
    merged = await s.event(older, "customer.profiles.merged")
    assert merged["merged_ids"] == [newer]

    async def survivor() -> dict[str, Any]:
        return await s.view(older)

    view = await survivor()
    assert view["preferences"]["consents"]["email"] is False
    log = (await s.svc.http.get(f"/customers/{older}/identity-log")).json()
    assert log["entries"][0]["action"] == "merged" and log["entries"][0]["proof"] == "phone"

    await s.channel.publish(UnmergeRequested(surviving_id=older, merged_id=newer, reason="test"))
    unmerged = await s.event(older, "customer.profiles.unmerged")
    assert unmerged["restored_id"] == newer
    restored = await s.event(newer)
    assert restored["email"] == f"{newer}@x.io" and restored["phones"] == [phone]
    assert restored["preferences"]["consents"]["email"] is False
    back = await s.view(older)
    assert back["merged_ids"] == [] and back["preferences"]["consents"]["email"] is True
    log = (await s.svc.http.get(f"/customers/{older}/identity-log")).json()
    assert [e["action"] for e in log["entries"]] == ["unmerged", "merged"]


async def test_4_push_devices_are_bounded_and_gone_ones_removed(s: Stack) -> None:
    customer = uid("cust")
    for n in range(3):
        await s.channel.publish(
            ContactDetailsUpdated(
                customer_id=customer,
                push_subscription={
                    "endpoint": f"https://push.example/{customer}/{n}",
                    "keys": {"p256dh": "k", "auth": "a", "spy": "x"},
                    "tracking": "x",
                },
                occurred_at=datetime.now(UTC) + timedelta(seconds=n),
            )
        )
        snapshot = await s.event(customer)
    endpoints = [sub["endpoint"] for sub in snapshot["push_subscriptions"]]
    assert endpoints == [f"https://push.example/{customer}/{n}" for n in (1, 2)]
    subs = snapshot["push_subscriptions"]
    assert all("tracking" not in sub and "spy" not in sub["keys"] for sub in subs)


async def test_4_a_device_found_gone_is_removed_at_the_profile(s: Stack) -> None:
    customer = uid("cust")
    endpoints = [f"https://push.example/{customer}/{n}" for n in range(2)]
    for n, endpoint in enumerate(endpoints):
        await s.channel.publish(
            ContactDetailsUpdated(
                customer_id=customer,
                push_subscription={"endpoint": endpoint, "keys": {"p256dh": "k", "auth": "a"}},
                occurred_at=datetime.now(UTC) + timedelta(seconds=n),
            )
        )
        await s.event(customer)
    await s.channel.publish(PushAddressesGone(customer_id=customer, endpoints=[endpoints[1]]))
    snapshot = await s.event(customer)
    assert [sub["endpoint"] for sub in snapshot["push_subscriptions"]] == [endpoints[0]]


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.1)
