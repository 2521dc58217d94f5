"""Fixtures for notification tests against the real broker, PostgreSQL, SMTP server and
push endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

import pytest
import pytest_asyncio
from notification_service.entrypoints.app import create_app
from omni_contracts import (
    CartAbandoned,
    Channel,
    Line,
    Money,
    Preferences,
    ProfileUpdated,
)
from omni_devkit.testing.events import ChannelPublisher
from omni_devkit.testing.services import RunningService, running


class Events:
    """Builders of the events these tests publish (the ``ev`` fixture)."""

    @staticmethod
    def uid(prefix: str) -> str:
        """A unique identifier with a readable prefix."""
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    @staticmethod
    def line(sku: str, qty: int = 1, price: str = "19.90") -> Line:
        """A cart or order line."""
        return Line(sku=sku, qty=qty, unit_price=Money(amount=Decimal(price), currency="EUR"))

    @staticmethod
    def profile(customer_id: str, version: int = 1, **fields: Any) -> ProfileUpdated:
        """A profile snapshot; ``preferences`` as a dict or a :class:`Preferences`."""
        prefs = fields.pop("preferences", {})
        if isinstance(prefs, dict):
            prefs = Preferences.model_validate(prefs)
        return ProfileUpdated(customer_id=customer_id, version=version, preferences=prefs, **fields)

    @staticmethod
    def cart(
        customer_id: str, *skus: str, cart_id: str | None = None, minutes_ago: int = 90
    ) -> CartAbandoned:
        """An abandoned cart of one unit of each SKU."""
        items = [Events.line(sku) for sku in skus]
        return CartAbandoned(
            cart_id=cart_id or Events.uid("cart"),
            customer_id=customer_id,
            channel=Channel.WEB,
            items=items,
            value=Money(amount=Decimal("19.90") * len(items), currency="EUR"),
            last_activity_at=datetime.now(UTC) - timedelta(minutes=minutes_ago),
        )

    @staticmethod
    async def wait_until(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:  # noqa: ASYNC109
        """Poll an (async) predicate until it is truthy; returns its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.05)

    MARKETING_EMAIL: ClassVar[dict[str, Any]] = {"consents": {"email": True}}
    MARKETING_ALL: ClassVar[dict[str, Any]] = {
        "consents": {"email": True, "push": True},
        "preferred_channel": "push",
    }

    @staticmethod
    async def given_profile(
        channel: ChannelPublisher, svc: RunningService, customer_id: str, **fields: Any
    ) -> ProfileUpdated:
        """Publish a profile snapshot and wait until the contact list has it (profiles and
        triggers travel on different topics, so nothing orders them otherwise)."""
        profile = Events.profile(customer_id, **fields)
        await channel.publish(profile)

        async def stored() -> bool:
            async with svc.runtime.pool.acquire() as conn:
                version = await conn.fetchval(
                    "SELECT version FROM contacts WHERE customer_id = $1", customer_id
                )
            return version is not None and version >= (profile.version or 0)

        await Events.wait_until(stored)
        return profile

    @staticmethod
    async def notifications(svc: RunningService, customer_id: str) -> list[dict[str, Any]]:
        """``GET /customers/{id}/notifications``."""
        response = await svc.http.get(f"/customers/{customer_id}/notifications")
        assert response.status_code == 200, response.text
        return response.json()

    @staticmethod
    async def settled(
        svc: RunningService, customer_id: str, count: int = 1
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` notifications of the shopper are final (or deferred)."""

        async def done() -> list[dict[str, Any]] | None:
            rows = await Events.notifications(svc, customer_id)
            final = [r for r in rows if r["status"] not in ("pending", "sending")]
            return rows if len(final) >= count else None

        return await Events.wait_until(done, timeout=20)


@pytest.fixture
def ev() -> type[Events]:
    """Event builders."""
    return Events


StartNotification = Callable[..., contextlib.AbstractAsyncContextManager[RunningService]]


@pytest.fixture
def start_notification(
    omni_env: Any, smtp_server: Any, push_endpoint: Any, vapid_keys: Any
) -> StartNotification:
    """Start a notification instance wired to the test's SMTP server and push endpoint."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[RunningService]:
        values: dict[str, Any] = {
            "smtp_url": smtp_server.url,
            "vapid_private_key_file": str(vapid_keys.private_key_file),
            "vapid_subject": "mailto:ops@omni.example",
            "fcm_project_id": "omni-test",
            "fcm_access_token": push_endpoint.fcm_access_token,
            "fcm_endpoint": push_endpoint.origin,
            "notify_public_url": "http://notification.test",
            "shop_url": "https://shop.example",
            "unsubscribe_secret": "a-test-secret-of-enough-length",
            # The push endpoint is the test's own, on loopback (production says deny).
            "notify_push_private_endpoints": "allow",
            "notify_timer_poll_s": 0.1,
            "notify_dispatch_poll_s": 0.1,
            "notify_retry_backoff_s": 0.01,
        }
        values.update(overrides)
        app = create_app(omni_env.settings("notification"), **values)
        async with running(app) as svc:
            yield svc

    return start


@pytest_asyncio.fixture
async def channel(omni_env: Any) -> AsyncIterator[ChannelPublisher]:
    """A producer on this test's topics (plays profile, order, inventory, loyalty)."""
    async with ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as publisher:
        yield publisher
