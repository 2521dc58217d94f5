"""Loyalty's read API: an account's balances and its ledger.

Every endpoint needs a channel's API key (``Authorization: Bearer <key>``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from omni_common.http import Channel
from pydantic import BaseModel

from loyalty_service.service.ledger import LoyaltyService

router = APIRouter(tags=["loyalty"])

Identifier = Annotated[str, Path(min_length=1, max_length=200)]


class OfferView(BaseModel):
    """The shopper's open offer."""

    offer_id: str
    sku: str
    reward: str
    valid_until: datetime


class AccountView(BaseModel):
    """A shopper's points: spendable, pending (return window), held (checkouts), lifetime."""

    customer_id: str
    available: int
    pending: int
    held: int
    lifetime: int
    tier: str
    tier_review_at: datetime | None
    next_expiry: datetime | None
    points_value: str
    open_offer: OfferView | None


class EntryView(BaseModel):
    """One ledger entry: ``points`` as published, the buckets' changes, the balance after."""

    entry_id: int
    kind: str
    points: int
    available_delta: int
    pending_delta: int
    held_delta: int
    balance: int
    reason: str
    order_id: str | None
    occurred_at: datetime


class LedgerPage(BaseModel):
    """A page of entries, newest first; pass ``next_before`` as ``before`` for the next."""

    entries: list[EntryView]
    next_before: int | None


def _service(request: Request) -> LoyaltyService:
    service: LoyaltyService = request.app.state.loyalty_service
    return service


@router.get("/accounts/{customer_id}", response_model=AccountView)
async def get_account(customer_id: Identifier, request: Request, _: Channel) -> Any:
    """Available, pending, held and lifetime points, tier, next expiry, the open offer."""
    view = await _service(request).account_view(customer_id)
    if view is None:
        raise HTTPException(status_code=404, detail=f"no loyalty account for {customer_id}")
    return view


@router.get("/accounts/{customer_id}/ledger", response_model=LedgerPage)
async def get_ledger(
    customer_id: Identifier,
    request: Request,
    _: Channel,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> Any:
    """The account's entries, newest first, ``limit`` per page."""
    service = _service(request)
    limit = min(limit, service.settings.loyalty_max_page_size)
    entries = await service.ledger_page(customer_id, limit=limit, before=before)
    if entries is None:
        raise HTTPException(status_code=404, detail=f"no loyalty account for {customer_id}")
    next_before = entries[-1]["entry_id"] if len(entries) == limit else None
    return {"entries": entries, "next_before": next_before}
