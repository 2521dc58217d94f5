"""Customer-profile's read API: a profile, its purchase history, lookup by contact or card.

Every route needs a channel's API key; the router carries that dependency in one place, so
finer scopes (shopper tokens, call-centre scopes) replace it there.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from omni_common.auth import require, require_shopper
from omni_common.handlers import Refusal
from omni_common.http import Runtime
from omni_contracts import Money, Preferences, PushSubscription
from pydantic import BaseModel, Field

from customer_profile_service.adapters.repository import HistoryCursor, ProfileRepository
from customer_profile_service.domain import IdKind, normalise
from customer_profile_service.service.context import Profiles
from customer_profile_service.service.identity import resolve, unmerge

Identifier = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]

# The one place the routes' authorisation is declared: customers.read reaches any shopper;
# web and app keys reach only their token's shopper (and never the lookup by e-mail/phone).
ROUTE_DEPENDENCIES = [Depends(require_shopper("customers.read"))]
# Undoing a merge is staff work: ops (admin) and call-centre keys hold identity.write.
UNMERGE_DEPENDENCIES = [Depends(require("identity.write"))]


class IdentityLogEntry(BaseModel):
    """One merge or unmerge: what joined (or left) which profile, when, on which proof."""

    customer_id: str = Field(description="The surviving profile")
    other_id: str = Field(description="The profile merged into it, or restored from it")
    action: str = Field(description="merged or unmerged")
    proof: str = Field(description="email, phone, loyalty_card, or request (an unmerge)")
    detail: str | None
    at: datetime


class IdentityLog(BaseModel):
    """A profile's merges and unmerges, newest first."""

    customer_id: str
    entries: list[IdentityLogEntry]


class UnmergeBody(BaseModel):
    """Which profile to restore from this one, and why."""

    merged_id: str = Field(min_length=1, max_length=200)
    reason: str = Field(min_length=1, max_length=200)


class Unmerged(BaseModel):
    """The merge undone: both profiles live again."""

    surviving_id: str
    restored_id: str


class Identifiers(BaseModel):
    """Every identifier known for a shopper."""

    anonymous_ids: list[str]
    emails: list[str]
    phones: list[str]
    loyalty_cards: list[str]


class Contact(BaseModel):
    """How to reach the shopper."""

    email: str | None
    phone: str | None
    push_tokens: list[str]
    push_subscriptions: list[PushSubscription]


class PurchaseSummary(BaseModel):
    """What the shopper bought, across channels (cancelled and rejected orders excluded)."""

    orders: int = Field(description="Purchases of every status")
    spend: list[Money] = Field(description="Spend per currency")
    last_purchase_at: datetime | None
    preferred_store: str | None


class CustomerView(BaseModel):
    """A shopper's profile as the API shows it."""

    customer_id: str
    created_at: datetime
    version: int
    identifiers: Identifiers
    contact: Contact
    preferences: Preferences
    merged_ids: list[str] = Field(description="Profiles merged into this one")
    summary: PurchaseSummary


class PurchaseLine(BaseModel):
    """One line of a purchase."""

    sku: str
    qty: int
    unit_price: Money


class Purchase(BaseModel):
    """One purchase of any channel."""

    order_id: str | None
    sale_id: str | None
    channel: str
    status: str
    placed_at: datetime
    location_id: str | None
    lines: list[PurchaseLine]
    total: Money


class HistoryPage(BaseModel):
    """A page of purchases, newest first."""

    customer_id: str
    items: list[Purchase]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page")


def _encode_cursor(placed_at: datetime, key: str) -> str:
    raw = json.dumps([placed_at.isoformat(), key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> HistoryCursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        placed_at, key = json.loads(raw)
        return HistoryCursor(datetime.fromisoformat(placed_at), str(key))
    except (binascii.Error, ValueError, TypeError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "cursor is not one this API gave") from exc


async def _view(repo: ProfileRepository, customer_id: str) -> CustomerView:
    p = await repo.profile(customer_id)
    assert p is not None
    ids = await repo.identifiers(customer_id)
    summary = await repo.summary(customer_id)
    spend: dict[str, Any] = json.loads(summary["spend"]) if summary["spend"] else {}
    return CustomerView(
        customer_id=customer_id,
        created_at=p.created_at,
        version=p.version,
        identifiers=Identifiers(
            anonymous_ids=ids[IdKind.ANONYMOUS_ID],
            emails=ids[IdKind.EMAIL],
            phones=ids[IdKind.PHONE],
            loyalty_cards=ids[IdKind.LOYALTY_CARD],
        ),
        contact=Contact(
            email=p.email,
            phone=p.phone,
            push_tokens=p.push_tokens,
            push_subscriptions=p.push_subscriptions,
        ),
        preferences=Preferences.model_validate(p.preferences),
        merged_ids=[i for i in await repo.group_of(customer_id) if i != customer_id],
        summary=PurchaseSummary(
            orders=await repo.order_count(customer_id),
            spend=[
                Money(amount=Decimal(amount), currency=currency)
                for currency, amount in sorted(spend.items())
            ],
            last_purchase_at=summary["last_purchase_at"],
            preferred_store=p.preferred_store,
        ),
    )


async def _live(repo: ProfileRepository, customer_id: str) -> str:
    live = await resolve(repo, customer_id)
    if live is None or await repo.is_erased(customer_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown customer {customer_id!r}")
    return live


def build_router() -> APIRouter:
    """The customer-profile API routes."""
    router = APIRouter(tags=["customers"], dependencies=ROUTE_DEPENDENCIES)

    @router.get("/customers/lookup", response_model=CustomerView)
    async def lookup(
        runtime: Runtime,
        email: Annotated[str | None, Query(max_length=320)] = None,
        phone: Annotated[str | None, Query(max_length=40)] = None,
        loyalty_card: Annotated[str | None, Query(max_length=200)] = None,
    ) -> CustomerView:
        """The profile holding an e-mail, phone or loyalty card (exactly one of them)."""
        given = [
            (kind, value)
            for kind, value in (
                (IdKind.EMAIL, email),
                (IdKind.PHONE, phone),
                (IdKind.LOYALTY_CARD, loyalty_card),
            )
            if value
        ]
        if len(given) != 1:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, "give exactly one of email, phone or loyalty_card"
            )
        kind, value = given[0]
        async with runtime.pool.acquire() as conn:
            repo = ProfileRepository(conn)
            owner = await repo.lookup(kind, normalise(kind, value))
            if owner is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no customer with that {kind}")
            return await _view(repo, await _live(repo, owner))

    @router.get("/customers/{customer_id}", response_model=CustomerView)
    async def get_customer(customer_id: Identifier, runtime: Runtime) -> CustomerView:
        """A profile with its purchase summary (a merged id answers with its survivor)."""
        async with runtime.pool.acquire() as conn:
            repo = ProfileRepository(conn)
            return await _view(repo, await _live(repo, customer_id))

    @router.get("/customers/{customer_id}/history", response_model=HistoryPage)
    async def history(
        customer_id: Identifier,
        runtime: Runtime,
        limit: Annotated[int, Query(ge=1, le=200)] = 20,
        cursor: Annotated[str | None, Query(max_length=500)] = None,
    ) -> HistoryPage:
        """Every purchase of every channel, newest first, ``limit`` at a time."""
        after = _decode_cursor(cursor) if cursor else None
        async with runtime.pool.acquire() as conn:
            repo = ProfileRepository(conn)
            live = await _live(repo, customer_id)
            rows = await repo.history(live, limit, after)
        items = [
            Purchase(
                order_id=r["order_id"],
                sale_id=r["purchase_key"][5:] if r["purchase_key"].startswith("sale:") else None,
                channel=r["channel"],
                status=r["status"],
                placed_at=r["placed_at"],
                location_id=r["location_id"],
                lines=[
                    PurchaseLine(
                        sku=ln["sku"],
                        qty=ln["qty"],
                        unit_price=Money(amount=Decimal(ln["unit_price"]), currency=ln["currency"]),
                    )
                    for ln in json.loads(r["lines"])
                ],
                total=Money(amount=r["total"], currency=r["currency"]),
            )
            for r in rows
        ]
        next_cursor = (
            _encode_cursor(rows[-1]["placed_at"], rows[-1]["purchase_key"])
            if len(rows) == limit
            else None
        )
        return HistoryPage(customer_id=live, items=items, next_cursor=next_cursor)

    @router.get("/customers/{customer_id}/identity-log", response_model=IdentityLog)
    async def identity_log(
        customer_id: Identifier,
        runtime: Runtime,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> IdentityLog:
        """Every merge and unmerge of the profile, newest first."""
        async with runtime.pool.acquire() as conn:
            repo = ProfileRepository(conn)
            live = await _live(repo, customer_id)
            rows = await repo.identity_log(await repo.group_of(live), limit)
        return IdentityLog(customer_id=live, entries=[IdentityLogEntry(**dict(r)) for r in rows])

    return router


def build_unmerge_router(policy: Profiles) -> APIRouter:
    """The route that undoes a merge (staff keys only)."""
    router = APIRouter(tags=["customers"], dependencies=UNMERGE_DEPENDENCIES)

    @router.post(
        "/customers/{customer_id}/unmerge",
        response_model=Unmerged,
        responses={409: {"description": "merged_id is not merged into this profile"}},
    )
    async def post_unmerge(
        customer_id: Identifier, body: UnmergeBody, runtime: Runtime
    ) -> Unmerged:
        """Restore ``merged_id`` from this profile with what was its own (see the
        ``customer.profiles.unmerge.requested`` event, which does the same)."""
        try:
            async with runtime.transaction("POST unmerge") as tx:
                await unmerge(policy, tx, customer_id, body.merged_id, body.reason)
        except Refusal as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return Unmerged(surviving_id=customer_id, restored_id=body.merged_id)

    return router
