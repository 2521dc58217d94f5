"""Outbound requests go only where they belong: a push subscription is no way into the
cluster, a push service's answer is read no further than its status, and the shopper is told
codes, never a provider's text."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from omni_contracts import Channel, OrderConfirmed
from omni_devkit.testing.events import record_headers


class Tripwire:
    """A TCP listener on loopback that only counts who connects (TLS or not)."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[Tripwire]:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


def _aimed_at(subscription: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """A subscription with working keys whose endpoint is ``endpoint``."""
    return {**subscription, "endpoint": endpoint}


async def test_push_endpoints_inside_the_network_are_never_called(
    start_notification, channel, smtp_server, push_endpoint, omni_env, ev
) -> None:
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    fallback_only = ev.uid("cust")
    outcomes = omni_env.reader("notification.dispatched.v1")
    keys = push_endpoint.subscribe()
    async with (
        Tripwire().listening() as tripwire,
        start_notification(notify_push_private_endpoints="deny") as svc,
    ):
        port = tripwire.port
        inside = [
            f"http://127.0.0.1:{port}/push/plain-http",
            f"https://127.0.0.1:{port}/push/loopback",
            f"https://localhost:{port}/push/a-name-for-loopback",
            f"https://[::ffff:127.0.0.1]:{port}/push/mapped",
            f"https://2130706433:{port}/push/decimal",
            f"https://127.1:{port}/push/short",
            f"https://0x7f.0.0.1:{port}/push/hex",
        ]
        subscriptions = [_aimed_at(keys, endpoint) for endpoint in inside]
        await ev.given_profile(
            channel,
            svc,
            customer,
            email=address,
            push_subscriptions=subscriptions,
            preferences={"preferred_channel": "push"},
        )
        await ev.given_profile(channel, svc, fallback_only, push_subscriptions=subscriptions)
        for who in (customer, fallback_only):
            await channel.publish(
                OrderConfirmed(order_id=ev.uid("order"), customer_id=who, channel=Channel.WEB)
            )
        # Refused push is a failed channel: the next one is tried.
        await smtp_server.wait_for(address)
        (row,) = await ev.settled(svc, customer)
        assert (row["status"], row["channel"]) == ("sent", "email")
        (row,) = await ev.settled(svc, fallback_only)
        assert (row["status"], row["reason"]) == ("failed", "push:endpoint_refused")
        failed = await outcomes.next(
            lambda r: record_headers(r)["ce_type"] == "notification.failed", timeout=20
        )
        assert json.loads(failed.value)["error"] == "push:endpoint_refused"
    assert tripwire.connections == 0


async def test_a_push_service_is_not_followed_nor_read_and_its_words_stay_ours(
    start_notification, channel, push_endpoint, ev
) -> None:
    redirected, chatty = ev.uid("cust"), ev.uid("cust")
    target = push_endpoint.subscribe()
    redirecting = push_endpoint.subscribe("redirect", redirect_to=target["endpoint"])
    huge = push_endpoint.subscribe("huge")
    async with start_notification() as svc:  # loopback allowed: the test's own push service
        for who, sub in ((redirected, redirecting), (chatty, huge)):
            await ev.given_profile(channel, svc, who, push_subscriptions=[sub])
            await channel.publish(
                OrderConfirmed(order_id=ev.uid("order"), customer_id=who, channel=Channel.WEB)
            )
        (row,) = await ev.settled(svc, redirected)
        assert (row["status"], row["reason"]) == ("failed", "push:endpoint_refused")
        (row,) = await ev.settled(svc, chatty)
        assert (row["status"], row["reason"]) == ("failed", "push:rejected")
    assert push_endpoint.received(target) == []
    # The refusal's body was megabytes long: the service stopped listening after its status.
    assert push_endpoint.huge_bytes_sent < push_endpoint.HUGE_BODY_BYTES
