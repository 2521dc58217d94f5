"""HTTP: what a shopper was told (and why not), and the one-click unsubscribe (RFC 8058)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse
from omni_common.auth import Caller, public, require_shopper
from omni_common.http import Runtime
from pydantic import BaseModel

from notification_service.adapters.repository import NotificationRepository
from notification_service.adapters.tokens import BadToken, UnsubscribeTokens
from notification_service.service.notify import Notifier


class NotificationView(BaseModel):
    """One notification as support sees it: what, how, and the outcome's reason."""

    notification_id: str
    kind: str
    purpose: str
    status: str
    reason: str | None
    channel: str | None
    language: str | None
    subject: str | None
    provider_message_id: str | None
    deferred_until: datetime | None
    attempts: int
    created_at: datetime
    updated_at: datetime


class UnsubscribeResult(BaseModel):
    """What a one-click unsubscribe withdrew."""

    status: str
    channel: str
    purpose: str


class RateLimiter:
    """A token bucket per key (a client's address): ``per_minute`` requests a minute, as a
    burst or spread out. The keys kept are bounded: the least recently seen go first."""

    def __init__(self, per_minute: int, max_keys: int = 10_000) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0 when ``key`` may go on (one token taken), else the seconds until it may."""
        now = time.monotonic()
        tokens, at = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


# The unsubscribe page runs nothing and loads nothing; it may only post its own form back
# to itself, be framed by nobody, and tell no other site the link it was reached by.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
UNSUBSCRIBE_PAGE = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Unsubscribe</title>'
    '</head><body><form method="post">'
    '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
    "<p>Stop receiving these e-mails?</p><button>Unsubscribe</button></form></body></html>"
)
"""No value from the request is in it: the form posts back to the very URL it came from."""

_REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Not a valid unsubscribe link, or an expired one"},
    429: {"description": "Too many requests from this address; see Retry-After"},
}


def build_router(
    notifier: Notifier, tokens: UnsubscribeTokens, max_page: int, limiter: RateLimiter
) -> APIRouter:
    """The service's routes, bound to its use cases."""
    router = APIRouter()

    @router.get(
        "/customers/{customer_id}/notifications",
        response_model=list[NotificationView],
        tags=["notifications"],
    )
    async def list_notifications(
        customer_id: Annotated[str, Path(min_length=1, max_length=200)],
        runtime: Runtime,
        _caller: Annotated[Caller, Depends(require_shopper("notifications.read"))],
        limit: Annotated[int, Query(ge=1)] = 50,
    ) -> list[NotificationView]:
        """What was sent, deferred, suppressed or failed for the shopper, newest first."""
        async with runtime.pool.acquire() as conn:
            rows = await NotificationRepository(conn).list_for(customer_id, min(limit, max_page))
        return [
            NotificationView(
                notification_id=r.notification_id,
                kind=r.kind,
                purpose=r.purpose,
                status=r.status,
                reason=r.reason,
                channel=r.channel,
                language=r.language,
                subject=r.subject,
                provider_message_id=r.provider_message_id,
                deferred_until=r.deferred_until,
                attempts=r.attempts,
                created_at=r.created_at,
                updated_at=r.updated_at,
            )
            for r in rows
        ]

    def _verify(token: str, request: Request) -> tuple[str, str, str]:
        client = request.client.host if request.client else "unknown"
        if wait := limiter.take(client):
            raise HTTPException(
                status_code=429,
                detail="too many unsubscribe requests; try again later",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        try:
            what = tokens.verify(token)
        except BadToken as exc:
            # The reason is ours, never the token: nothing of the request is echoed.
            raise HTTPException(
                status_code=400, detail=f"invalid unsubscribe link: {exc}"
            ) from None
        return what.customer_id, what.channel, what.purpose

    @router.post(
        "/unsubscribe/{token}",
        response_model=UnsubscribeResult,
        tags=["consent"],
        responses=_REFUSALS,
        dependencies=[Depends(public("the signed token in the link is the authorisation"))],
    )
    async def unsubscribe(token: str, request: Request, runtime: Runtime) -> UnsubscribeResult:
        """One-click unsubscribe (RFC 8058): the signed token is the authorisation.

        Mail clients POST ``List-Unsubscribe=One-Click``; the consent is withdrawn here at
        once and ``customer.preferences.updated`` tells the profile, which owns consent.
        """
        customer_id, channel, purpose = _verify(token, request)
        async with runtime.transaction() as tx:
            await notifier.unsubscribe(tx, customer_id, channel, purpose)
        return UnsubscribeResult(status="unsubscribed", channel=channel, purpose=purpose)

    @router.get(
        "/unsubscribe/{token}",
        response_class=HTMLResponse,
        tags=["consent"],
        responses=_REFUSALS,
        dependencies=[Depends(public("the signed token in the link is the authorisation"))],
    )
    async def unsubscribe_page(token: str, request: Request) -> HTMLResponse:
        """A page with a button: a GET never unsubscribes (link scanners follow links)."""
        _verify(token, request)
        return HTMLResponse(UNSUBSCRIBE_PAGE, headers=PAGE_HEADERS)

    return router
