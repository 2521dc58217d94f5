"""Loyalty's read API: an account's balances and its ledger.

Every endpoint declares its scope (:mod:`omni_common.auth`): ``loyalty.read`` to read an
account (web and app only their own shopper's, with the shopper's token), ``loyalty.write``
to correct one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from omni_common.auth import Caller, require, require_shopper
from omni_common.http import request_runtime
from omni_contracts import BoundedModel, SignedCount
from pydantic import BaseModel, ConfigDict, Field

from loyalty_service.service.ledger import LoyaltyService, NotEnoughPoints, UnknownAccount

router = APIRouter(tags=["loyalty"])

Identifier = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]
AccountReader = Annotated[Caller, Depends(require_shopper("loyalty.read"))]
AccountWriter = Annotated[Caller, Depends(require("loyalty.write"))]


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
    service: LoyaltyService = request.app.state.loyalty
    return service


@router.get("/accounts/{customer_id}", response_model=AccountView)
async def get_account(customer_id: Identifier, request: Request, _: AccountReader) -> Any:
    """Available, pending, held and lifetime points, tier, next expiry, the open offer."""
    view = await _service(request).account_view(request_runtime(request), customer_id)
    if view is None:
        raise HTTPException(status_code=404, detail=f"no loyalty account for {customer_id}")
    return view


@router.get("/accounts/{customer_id}/ledger", response_model=LedgerPage)
async def get_ledger(
    customer_id: Identifier,
    request: Request,
    _: AccountReader,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> Any:
    """The account's entries, newest first, ``limit`` per page."""
    service = _service(request)
    limit = min(limit, service.settings.loyalty_max_page_size)
    entries = await service.ledger_page(
        request_runtime(request), customer_id, limit=limit, before=before
    )
    if entries is None:
        raise HTTPException(status_code=404, detail=f"no loyalty account for {customer_id}")
    next_before = entries[-1]["entry_id"] if len(entries) == limit else None
    return {"entries": entries, "next_before": next_before}


class AdjustmentBody(BoundedModel):
    """A manual correction: points added (positive) or taken (negative)."""

    model_config = ConfigDict(extra="forbid")

    adjustment_id: str = Field(min_length=1, max_length=200, description="Idempotency key")
    points: SignedCount = Field(description="Signed, not zero")
    reason: str = Field(min_length=1, max_length=100, examples=["goodwill", "fraud"])


@router.post(
    "/accounts/{customer_id}/adjustments",
    response_model=EntryView,
    status_code=201,
    responses={
        200: {"description": "This adjustment was applied before"},
        404: {"description": "No such account"},
        422: {"description": "Zero points, or more taken than available"},
    },
)
async def post_adjustment(
    customer_id: Identifier, body: AdjustmentBody, request: Request, caller: AccountWriter
) -> Any:
    """Correct a shopper's spendable points, once per ``adjustment_id``."""
    if body.points == 0:
        raise HTTPException(status_code=422, detail="an adjustment needs non-zero points")
    service = _service(request)
    try:
        async with request_runtime(request).transaction("POST adjustment") as tx:
            entry = await service.adjust(
                tx,
                customer_id,
                adjustment_id=body.adjustment_id,
                points=body.points,
                reason=body.reason,
                by=caller.channel,
            )
    except UnknownAccount:
        raise HTTPException(
            status_code=404, detail=f"no loyalty account for {customer_id}"
        ) from None
    except NotEnoughPoints as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    if entry is None:
        return JSONResponse(
            {"detail": f"adjustment {body.adjustment_id} was applied before"}, status_code=200
        )
    return {
        "entry_id": entry.entry_id,
        "kind": entry.kind.value,
        "points": entry.points,
        "available_delta": entry.points,
        "pending_delta": 0,
        "held_delta": 0,
        "balance": entry.balance,
        "reason": entry.reason,
        "order_id": None,
        "occurred_at": entry.occurred_at,
    }
