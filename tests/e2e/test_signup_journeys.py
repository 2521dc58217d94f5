"""Sign-up journeys across the real customer-profile and notification services.

A new shopper signs up the natural way: the web site sends ``customer.contact.updated``
and ``customer.preferences.updated`` and never a login (no ``customer.identified``), then
fills a cart and leaves it. Nothing is faked in between: customer-profile starts the
profile from those signals, publishes its snapshot, notices the abandoned cart and
announces it; notification takes the snapshot in and reminds the shopper on the channel
they chose: e-mail into the real SMTP server's Maildir, Web Push at a loopback push
service that verifies VAPID and decrypts, or later, after their quiet hours. And a browser
subscription the push service says is gone (410) is forgotten by the profile as well, so
the next snapshot does not hand it back to notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from customer_profile_service.entrypoints.app import create_app as create_profile
from customer_profile_service.settings import ProfileSettings
from notification_service.entrypoints.app import create_app as create_notification
from omni_contracts import (
    CartItemAdded,
    ContactDetailsUpdated,
    Line,
    Money,
    PreferencesUpdated,
)
from omni_devkit.testing.events import ChannelPublisher, record_headers
from omni_devkit.testing.plugin import OmniTestEnv, TopicReader, isolated_env
from omni_devkit.testing.push import PushEndpoint
from omni_devkit.testing.services import RunningService, running

pytestmark = pytest.mark.e2e

DELAY_S = 1.5  # the cart abandonment delay


def r_key(record: Any) -> str:
    return record.key.decode() if record.key else ""


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Platform:
    """Customer-profile and notification, a channel publisher and their outputs."""

    env: OmniTestEnv
    profile: RunningService
    notification: RunningService
    channel: ChannelPublisher
    snapshots: TopicReader
    abandoned: TopicReader
    outcomes: TopicReader
    push: PushEndpoint

    async def sign_up(
        self, contact: ContactDetailsUpdated, preferences: PreferencesUpdated, *, reverse: bool
    ) -> None:
        """The web site's two sign-up signals, in either order, and no login."""
        first, second = (preferences, contact) if reverse else (contact, preferences)
        await self.channel.publish(first)
        await self.channel.publish(second)

    async def leave_a_cart(self, customer: str, sku: str) -> str:
        """The shopper fills a cart on the web site and goes away."""
        cart = uid("cart")
        await self.channel.publish(
            CartItemAdded(
                cart_id=cart,
                channel="web",
                customer_id=customer,
                anonymous_id=uid("dev"),
                sku=sku,
                items=[
                    Line(sku=sku, qty=1, unit_price=Money(amount=Decimal("25.00"), currency="EUR"))
                ],
                occurred_at=datetime.now(UTC),
            )
        )
        return cart

    async def announced(self, cart: str) -> dict[str, Any]:
        """The profile's ``cart.abandoned`` for ``cart``."""
        record = await self.abandoned.next(lambda r: r.key == cart.encode(), timeout=30)
        return json.loads(record.value)

    async def outcome(self, customer: str, ce_type: str) -> dict[str, Any]:
        """The next ``ce_type`` cart-reminder outcome for ``customer``."""
        record = await self.outcomes.next(
            lambda r: (
                record_headers(r)["ce_type"] == ce_type
                and json.loads(r.value)["customer_id"] == customer
                and json.loads(r.value).get("template") == "cart_reminder"
            ),
            timeout=30,
        )
        return json.loads(record.value)

    async def known(self, customer: str) -> None:
        """Wait until notification took in the snapshot saying both sign-up signals (the
        profile and the cart's reminder travel on different topics)."""

        async def both() -> bool:
            async with self.notification.runtime.pool.acquire() as conn:
                return bool(
                    await conn.fetchval(
                        "SELECT 1 FROM contacts WHERE customer_id = $1 AND email IS NOT NULL"
                        " AND preferences->>'preferred_channel' IS NOT NULL",
                        customer,
                    )
                )

        await until(both)


async def until(predicate: Any, timeout: float = 20.0) -> Any:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await predicate()):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
    return value


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def platform(
    kafka_bootstrap: str, postgres_url: str, smtp_server: Any, vapid_keys: Any
) -> AsyncIterator[Platform]:
    async with (
        isolated_env(kafka_bootstrap, postgres_url) as env,
        PushEndpoint(vapid_public_key=vapid_keys.public_key) as push,
    ):
        profile = create_profile(
            ProfileSettings.from_settings(
                env.settings("customer-profile"),
                cart_abandonment_delay=timedelta(seconds=DELAY_S),
                cart_timer_poll_s=0.1,
            )
        )
        notification = create_notification(
            env.settings("notification"),
            smtp_url=smtp_server.url,
            vapid_private_key_file=str(vapid_keys.private_key_file),
            unsubscribe_secret="an-e2e-secret-of-enough-length",
            notify_push_private_endpoints="allow",  # the push service is on loopback
            notify_dispatch_poll_s=0.1,
            notify_timer_poll_s=0.1,
        )
        async with contextlib.AsyncExitStack() as stack:
            enter = stack.enter_async_context
            yield Platform(
                env,
                await enter(running(profile)),
                await enter(running(notification)),
                await enter(ChannelPublisher(env.bootstrap, env.prefix)),
                await enter(env.reader("customer.profile.v1")),
                await enter(env.reader("cart.abandoned.v1")),
                await enter(env.reader("notification.dispatched.v1")),
                push,
            )


@pytest.mark.parametrize(
    ("verified", "reverse"),
    [(True, False), (False, True)],
    ids=["verified-contact-first", "unverified-preferences-first"],
)
async def test_a_new_shopper_who_leaves_a_cart_gets_the_reminder_by_email(
    platform: Platform, smtp_server: Any, verified: bool, reverse: bool
) -> None:
    customer = uid("cust")
    address = f"{customer}@example.com"
    await platform.sign_up(
        ContactDetailsUpdated(customer_id=customer, email=address, email_verified=verified),
        PreferencesUpdated(
            customer_id=customer,
            preferences={"consents": {"email": True}, "preferred_channel": "email"},
        ),
        reverse=reverse,
    )
    # Notification knows the shopper from the profile's snapshot alone.
    await platform.known(customer)
    sku = uid("SKU")
    cart = await platform.leave_a_cart(customer, sku)

    assert (await platform.announced(cart))["customer_id"] == customer
    (mail,) = await smtp_server.wait_for(address, timeout=30)
    assert mail["Subject"] == "You left something in your cart"
    assert sku in mail.get_body(preferencelist=("plain",)).get_content()
    sent = await platform.outcome(customer, "notification.sent")
    assert sent["channel"] == "email"


async def test_a_new_shopper_who_prefers_push_gets_the_reminder_at_their_browser(
    platform: Platform, smtp_server: Any
) -> None:
    customer = uid("cust")
    address = f"{customer}@example.com"
    browser = platform.push.subscribe()
    await platform.sign_up(
        ContactDetailsUpdated(customer_id=customer, email=address, push_subscription=browser),
        PreferencesUpdated(
            customer_id=customer,
            preferences={"consents": {"email": True, "push": True}, "preferred_channel": "push"},
        ),
        reverse=False,
    )
    await platform.known(customer)
    cart = await platform.leave_a_cart(customer, uid("SKU"))

    (message,) = await platform.push.wait_for(browser, timeout=30)
    assert message.json()["title"] == "You left something in your cart"
    assert message.json()["url"].endswith(f"/cart/{cart}")
    sent = await platform.outcome(customer, "notification.sent")
    assert sent["channel"] == "push"
    assert smtp_server.messages_to(address) == []
    assert platform.push.rejected == []


async def test_a_new_shopper_in_their_quiet_hours_is_reminded_when_they_end(
    platform: Platform, smtp_server: Any
) -> None:
    customer = uid("cust")
    address = f"{customer}@example.com"
    zone = ZoneInfo("America/New_York")
    now = datetime.now(zone)
    # Quiet since an hour ago, over shortly after the cart is abandoned (New York time).
    start = (now - timedelta(hours=1)).time().replace(microsecond=0)
    end = (now + timedelta(seconds=DELAY_S + 10)).time().replace(microsecond=0)
    await platform.sign_up(
        ContactDetailsUpdated(customer_id=customer, email=address, email_verified=True),
        PreferencesUpdated(
            customer_id=customer,
            preferences={
                "consents": {"email": True},
                "preferred_channel": "email",
                "time_zone": "America/New_York",
                "quiet_hours_start": start.isoformat(),
                "quiet_hours_end": end.isoformat(),
            },
        ),
        reverse=True,
    )
    await platform.known(customer)
    cart = await platform.leave_a_cart(customer, uid("SKU"))

    await platform.announced(cart)
    deferred = await platform.outcome(customer, "notification.deferred")
    until_ = datetime.fromisoformat(deferred["until"])
    assert until_.astimezone(zone).time() == end
    assert until_ > datetime.now(UTC)
    assert smtp_server.messages_to(address) == []  # not now

    await smtp_server.wait_for(address, timeout=30)
    assert datetime.now(UTC) >= until_
    assert (await platform.outcome(customer, "notification.sent"))["channel"] == "email"


async def test_a_browser_subscription_found_gone_is_forgotten_by_the_profile_too(
    platform: Platform, smtp_server: Any
) -> None:
    customer = uid("cust")
    address = f"{customer}@example.com"
    gone = platform.push.subscribe("gone")  # the push service answers 410
    await platform.sign_up(
        ContactDetailsUpdated(
            customer_id=customer,
            email=address,
            push_subscription=gone,
            # The web site's clock runs ahead of notification's: the verdict still wins.
            occurred_at=datetime.now(UTC) + timedelta(seconds=30),
        ),
        PreferencesUpdated(
            customer_id=customer,
            preferences={"consents": {"email": True, "push": True}, "preferred_channel": "push"},
        ),
        reverse=False,
    )
    await platform.known(customer)
    await platform.leave_a_cart(customer, uid("SKU"))

    # Push first, found gone, so e-mail: and notification tells the profile.
    await smtp_server.wait_for(address, timeout=30)
    assert (await platform.outcome(customer, "notification.sent"))["channel"] == "email"

    def forgets(record: Any) -> bool:
        return (
            r_key(record) == customer
            and record_headers(record).get("ce_type") == "customer.profile.updated"
            and json.loads(record.value)["push_subscriptions"] == []
        )

    await platform.snapshots.next(forgets, timeout=30)
    # The next snapshot (another change of the shopper's) does not bring it back.
    await platform.channel.publish(
        ContactDetailsUpdated(customer_id=customer, phone="+33612345678")
    )

    async def phone_known() -> dict[str, Any] | None:
        async with platform.notification.runtime.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT phone, push_subscriptions FROM contacts WHERE customer_id = $1", customer
            )
        return dict(row) if row and row["phone"] else None

    contact = await until(phone_known)
    assert json.loads(contact["push_subscriptions"]) == []
