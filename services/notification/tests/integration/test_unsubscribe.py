"""The one-click unsubscribe (RFC 8058) as an attacker and an operator would try it: the page
escapes what it is given, links are strict, expire and survive a secret's rotation, the
endpoint is rate-limited, and production refuses to run without a secret."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from notification_service.entrypoints.app import create_app
from omni_common.settings import Misconfigured
from omni_devkit.testing.services import running

FORM = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": ""}


async def _unsubscribe_path(svc: Any, channel: Any, smtp_server: Any, ev: Any) -> str:
    """A real link: a cart reminder's List-Unsubscribe, as the shopper's mail client has it."""
    customer, address = ev.uid("cust"), f"{ev.uid('shopper')}@example.com"
    await ev.given_profile(channel, svc, customer, email=address, preferences=ev.MARKETING_EMAIL)
    await channel.publish(ev.cart(customer, "SKU-RED-SHOE"))
    (mail,) = await smtp_server.wait_for(address)
    return str(mail["List-Unsubscribe"].strip("<>").removeprefix("http://notification.test"))


async def test_the_unsubscribe_page_reflects_no_markup_and_forbids_scripts(
    start_notification, channel, smtp_server, ev
) -> None:
    async with start_notification() as svc:
        path = await _unsubscribe_path(svc, channel, smtp_server, ev)
        for tail in (
            '"><img src=x onerror=alert(1)>',  # after the signature
            "==<b onmouseover=alert(1)>x",  # after base64 padding
            "%3Csvg%20onload%3Dalert(1)%3E",
        ):
            response = await svc.http.get(path + tail, headers={"Authorization": ""})
            assert response.status_code == 400, (tail, response.text)
            assert not any(tag in response.text for tag in ("<img", "<b ", "<svg"))
            refused = await svc.http.post(path + tail, content="x", headers=FORM)
            assert refused.status_code == 400
        page = await svc.http.get(path, headers={"Authorization": ""})
        assert page.status_code == 200, page.text
        policy = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["Referrer-Policy"] == "no-referrer"


async def test_links_expire(start_notification, channel, smtp_server, ev) -> None:
    # A lifetime of two seconds stands for the default ninety days.
    async with start_notification(unsubscribe_token_max_age_days=2 / 86400) as svc:
        path = await _unsubscribe_path(svc, channel, smtp_server, ev)
        await asyncio.sleep(3)
        response = await svc.http.post(path, content="List-Unsubscribe=One-Click", headers=FORM)
        assert response.status_code == 400
        assert "expired" in response.json()["detail"]


async def test_a_link_signed_before_a_rotation_still_works_while_the_old_secret_is_kept(
    start_notification, channel, smtp_server, ev
) -> None:
    old, new = "the-secret-we-rotate-out-now", "the-secret-we-rotate-in-now"
    async with start_notification(unsubscribe_secret=old) as svc:
        path = await _unsubscribe_path(svc, channel, smtp_server, ev)
    async with start_notification(unsubscribe_secret=new) as svc:
        response = await svc.http.post(path, content="List-Unsubscribe=One-Click", headers=FORM)
        assert response.status_code == 400
    async with start_notification(unsubscribe_secret=new, unsubscribe_secret_previous=old) as svc:
        response = await svc.http.post(path, content="List-Unsubscribe=One-Click", headers=FORM)
        assert response.status_code == 200, response.text


async def test_the_unsubscribe_endpoint_is_rate_limited(
    start_notification, channel, smtp_server, ev
) -> None:
    async with start_notification(notify_unsubscribe_per_minute=5) as svc:
        path = await _unsubscribe_path(svc, channel, smtp_server, ev)
        codes = []
        for _ in range(8):
            response = await svc.http.get(path + "x", headers={"Authorization": ""})
            codes.append(response.status_code)
        assert codes[:5] == [400] * 5
        assert codes[5:] == [429] * 3
        assert int(response.headers["Retry-After"]) >= 1


async def test_production_refuses_to_start_without_an_unsubscribe_secret(
    omni_env, caplog: pytest.LogCaptureFixture
) -> None:
    production = omni_env.settings("notification", omni_env="production")
    with pytest.raises(Misconfigured, match="UNSUBSCRIBE_SECRET"):
        async with running(create_app(production, unsubscribe_secret="")):
            pass
    async with running(create_app(production, unsubscribe_secret="a-production-secret-0123")):
        pass
    # A developer's machine may go without: links then die with the process, and it says so.
    with caplog.at_level("WARNING"):
        async with running(create_app(omni_env.settings("notification"), unsubscribe_secret="")):
            pass
    assert "UNSUBSCRIBE_SECRET is not set" in caplog.text
