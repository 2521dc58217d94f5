"""The order service's HTTP API: place, read and cancel orders.

Every route declares its scope (:mod:`omni_common.auth`): ``checkout.write`` to place,
``orders.read`` to read, ``orders.cancel`` to cancel. Web and app keys act for one shopper
only, with that shopper's token: their checkouts must name the token's ``customer_id``, and
another shopper's order does not exist for them (404).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from omni_common.auth import Caller, require, require_shopper
from omni_common.http import Runtime
from omni_contracts import (
    MAX_LINES,
    BoundedModel,
    Channel,
    CheckoutSubmitted,
    Fulfillment,
    Line,
    Money,
    NonEmptyStr,
    Payment,
    Quantity,
    UtcDatetime,
)
from pydantic import Field, ValidationError

from order_service.domain.errors import (
    IdempotencyConflict,
    IllegalTransition,
    InvalidOrder,
    OrderNotFound,
)
from order_service.entrypoints.views import (
    OrderDetail,
    OrderPage,
    OrderView,
    ReturnView,
    decode_cursor,
    encode_cursor,
)
from order_service.service.orders import OrderService


def order_service(request: Request) -> OrderService:
    """The app's order service (a FastAPI dependency)."""
    service: OrderService = request.app.state.orders
    return service


Orders = Annotated[OrderService, Depends(order_service)]
Checkout = Annotated[Caller, Depends(require("checkout.write", shopper=True))]
OrderReader = Annotated[Caller, Depends(require("orders.read", shopper=True))]
OrderCanceller = Annotated[Caller, Depends(require("orders.cancel", shopper=True))]
CustomerOrders = Annotated[Caller, Depends(require_shopper("orders.read"))]
Identifier = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]


class CheckoutRequest(BoundedModel):
    """A checkout, as on ``checkout.submitted.v1``; ``checkout_id`` may come as the
    ``Idempotency-Key`` header instead, ``channel`` defaults to the API key's channel."""

    checkout_id: NonEmptyStr | None = None
    customer_id: NonEmptyStr
    channel: Channel | None = None
    lines: list[Line] = Field(min_length=1, max_length=MAX_LINES)
    fulfillment: Fulfillment
    payment: Payment
    cart_id: NonEmptyStr | None = None
    points_to_redeem: Quantity | None = None
    total: Money | None = None
    occurred_at: UtcDatetime | None = None


class CancelRequest(BoundedModel):
    """Why an order is cancelled."""

    reason: NonEmptyStr = "requested"


def _problem(code: int, reason: str, message: str, **extra: Any) -> HTTPException:
    return HTTPException(code, detail={"reason": reason, "message": message, **extra})


router = APIRouter(tags=["orders"])


@router.post(
    "/orders",
    status_code=201,
    response_model=OrderView,
    responses={
        200: {"description": "The order this idempotency key created before"},
        409: {"description": "The idempotency key was used with a different checkout"},
        422: {"description": "Not a valid checkout (e.g. the payment does not cover it)"},
    },
)
async def place_order(
    body: CheckoutRequest,
    response: Response,
    caller: Checkout,
    orders: Orders,
    runtime: Runtime,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
    ] = None,
) -> OrderView:
    """Place an order (same path and rules as ``checkout.submitted.v1``).

    Resubmitting with the same key (``checkout_id`` or ``Idempotency-Key``) returns the same
    order (200); the same key with a different checkout is refused (409).
    """
    if idempotency_key and body.checkout_id and idempotency_key != body.checkout_id:
        raise _problem(422, "invalid_order", "Idempotency-Key and checkout_id differ")
    caller.check_shopper(body.customer_id)
    if caller.shopper_id is not None and body.channel and body.channel.value != caller.channel:
        # A shopper's key places orders of its own channel only (no posing as a store).
        raise _problem(403, "wrong_channel", f"the {caller.channel} key places only its orders")
    checkout_id = idempotency_key or body.checkout_id or f"http-{uuid.uuid4().hex}"
    channel = body.channel or _channel_of_key(caller.channel)
    fields = body.model_dump(exclude_none=True, exclude={"checkout_id", "channel"})
    try:
        checkout = CheckoutSubmitted(**fields, checkout_id=checkout_id, channel=channel)
    except ValidationError as exc:
        detail = exc.errors(include_url=False, include_context=False, include_input=False)
        raise HTTPException(422, detail=detail) from exc
    try:
        async with runtime.transaction("POST /orders") as tx:
            placement = await orders.place_order(tx, checkout)
    except IdempotencyConflict as exc:
        raise _problem(409, exc.reason, exc.message) from exc
    except InvalidOrder as exc:
        raise _problem(422, exc.reason, exc.message) from exc
    response.status_code = 201 if placement.created else 200
    response.headers["Location"] = f"/orders/{placement.order.order_id}"
    return OrderView.of(placement.order)


@router.get("/orders/{order_id}", response_model=OrderDetail, responses={404: {}})
async def get_order(
    order_id: Identifier, caller: OrderReader, orders: Orders, runtime: Runtime
) -> OrderDetail:
    """One order with its status history and returns."""
    try:
        order, history, returns = await orders.get(runtime, order_id)
        if not caller.acts_for(order.customer_id):
            raise OrderNotFound(f"no order {order_id}")
    except OrderNotFound as exc:
        raise _problem(404, exc.reason, exc.message) from exc
    return OrderDetail(
        **OrderView.of(order).model_dump(),
        history=history,
        returns=[ReturnView(**{**r, "refund": order.money(r["refund"])}) for r in returns],
    )


@router.post(
    "/orders/{order_id}/cancel",
    response_model=OrderView,
    responses={404: {}, 409: {"description": "Too late: the order is fulfilled or closed"}},
)
async def cancel_order(
    order_id: Identifier,
    caller: OrderCanceller,
    orders: Orders,
    runtime: Runtime,
    body: CancelRequest | None = None,
) -> OrderView:
    """Cancel an order before fulfilment (its stock is released); 409 once shipped or
    collected. Cancelling a cancelled order again is harmless."""
    reason = body.reason if body is not None else "requested"
    try:
        if caller.shopper_id is not None:
            mine, _, _ = await orders.get(runtime, order_id)
            if not caller.acts_for(mine.customer_id):
                raise OrderNotFound(f"no order {order_id}")
        async with runtime.transaction("POST /orders/{order_id}/cancel") as tx:
            order = await orders.cancel(tx, order_id, reason)
    except OrderNotFound as exc:
        raise _problem(404, exc.reason, exc.message) from exc
    except IllegalTransition as exc:
        raise _problem(409, exc.reason, exc.message, status=exc.current.value) from exc
    return OrderView.of(order)


@router.get("/customers/{customer_id}/orders", response_model=OrderPage)
async def customer_orders(
    customer_id: Identifier,
    _: CustomerOrders,
    orders: Orders,
    runtime: Runtime,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> OrderPage:
    """A shopper's orders of every channel (in-store sales included), newest first."""
    try:
        after = decode_cursor(cursor) if cursor else None
    except ValueError as exc:
        raise _problem(400, "invalid_cursor", str(exc)) from exc
    limit = min(limit, orders.settings.max_page_size)
    # One more than asked tells whether there is a next page.
    found = await orders.for_customer(runtime, customer_id, limit=limit + 1, after=after)
    page = found[:limit]
    next_cursor = encode_cursor(page[-1]) if len(found) > limit else None
    return OrderPage(orders=[OrderView.of(o) for o in page], next_cursor=next_cursor)


def _channel_of_key(api_channel: str) -> Channel:
    try:
        return Channel(api_channel)
    except ValueError:
        raise _problem(
            422, "invalid_order", f"say which channel: the API key's {api_channel!r} is not one"
        ) from None
