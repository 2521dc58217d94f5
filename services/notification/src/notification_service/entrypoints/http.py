"""HTTP: what a shopper was told (and why not), and the one-click unsubscribe (RFC 8058)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

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


def build_router(notifier: Notifier, tokens: UnsubscribeTokens, max_page: int) -> APIRouter:
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

    def _verify(token: str) -> tuple[str, str, str]:
        try:
            what = tokens.verify(token)
        except BadToken as exc:
            raise HTTPException(
                status_code=400, detail=f"invalid unsubscribe link: {exc}"
            ) from None
        if what.channel not in ("email", "push", "sms") or what.purpose not in (
            "marketing",
            "transactional",
        ):
            raise HTTPException(status_code=400, detail="invalid unsubscribe link")
        return what.customer_id, what.channel, what.purpose

    @router.post(
        "/unsubscribe/{token}",
        response_model=UnsubscribeResult,
        tags=["consent"],
        dependencies=[Depends(public("the signed token in the link is the authorisation"))],
    )
    async def unsubscribe(token: str, request: Request, runtime: Runtime) -> UnsubscribeResult:
        """One-click unsubscribe (RFC 8058): the signed token is the authorisation.

        Mail clients POST ``List-Unsubscribe=One-Click``; the consent is withdrawn here at
        once and ``customer.preferences.updated`` tells the profile, which owns consent.
        """
        customer_id, channel, purpose = _verify(token)
        async with runtime.transaction() as tx:
            await notifier.unsubscribe(tx, customer_id, channel, purpose)
        return UnsubscribeResult(status="unsubscribed", channel=channel, purpose=purpose)

    @router.get(
        "/unsubscribe/{token}",
        response_class=HTMLResponse,
        tags=["consent"],
        dependencies=[Depends(public("the signed token in the link is the authorisation"))],
    )
    async def unsubscribe_page(token: str) -> HTMLResponse:
        """A page with a button: a GET never unsubscribes (link scanners follow links)."""
        _verify(token)
        return HTMLResponse(
            "<!doctype html><title>Unsubscribe</title>"
            f'<form method="post" action="/unsubscribe/{token}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            "<p>Stop receiving these e-mails?</p><button>Unsubscribe</button></form>"
        )

    return router
