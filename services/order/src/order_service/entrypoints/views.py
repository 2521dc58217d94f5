"""What the read API shows of an order (response models, for the OpenAPI document too)."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from omni_contracts import (
    Allocation,
    Channel,
    Fulfillment,
    Money,
    OrderStatus,
    Shortage,
    UtcDatetime,
)
from pydantic import BaseModel, Field

from order_service.adapters.repository import PageCursor
from order_service.domain.model import Order


class OrderLineView(BaseModel):
    """One line of an order."""

    sku: str
    qty: int
    unit_price: Money
    returned_qty: int


class OrderView(BaseModel):
    """An order as channels and support see it."""

    order_id: str
    customer_id: str | None
    channel: Channel
    status: OrderStatus
    placed_at: UtcDatetime
    lines: list[OrderLineView]
    fulfillment: Fulfillment
    total: Money
    paid: Money
    refunded: Money
    checkout_id: str | None = None
    sale_id: str | None = None
    cart_id: str | None = None
    pending_confirmations: list[str] = Field(default_factory=list)
    allocations: list[Allocation] = Field(default_factory=list)
    shortages: list[Shortage] = Field(default_factory=list)
    reason: str | None = None
    carrier: str | None = None
    tracking_id: str | None = None
    promised_by: UtcDatetime | None = None
    eta: UtcDatetime | None = None
    collect_by: UtcDatetime | None = None

    @classmethod
    def of(cls, order: Order) -> OrderView:
        """The view of an order."""
        return cls(
            order_id=order.order_id,
            customer_id=order.customer_id,
            channel=order.channel,
            status=order.status,
            placed_at=order.placed_at,
            lines=[
                OrderLineView(
                    sku=line.sku,
                    qty=line.qty,
                    unit_price=order.money(line.unit_price),
                    returned_qty=line.returned_qty,
                )
                for line in order.lines
            ],
            fulfillment=order.fulfillment,
            total=order.money(order.total),
            paid=order.money(order.paid),
            refunded=order.money(order.refunded),
            checkout_id=order.checkout_id,
            sale_id=order.sale_id,
            cart_id=order.cart_id,
            pending_confirmations=sorted(order.pending_confirmations),
            allocations=order.allocations,
            shortages=order.shortages,
            reason=order.reason,
            carrier=order.carrier,
            tracking_id=order.tracking_id,
            promised_by=order.promised_by,
            eta=order.eta,
            collect_by=order.collect_by,
        )


class ReturnView(BaseModel):
    """A return handed in for an order."""

    return_id: str
    location_id: str
    channel: Channel
    lines: list[dict[str, Any]]
    not_accepted: list[dict[str, Any]] = Field(default_factory=list)
    refund: Money
    received_at: UtcDatetime


class OrderDetail(OrderView):
    """An order with its history and returns (``GET /orders/{order_id}``)."""

    history: list[dict[str, Any]] = Field(default_factory=list)
    returns: list[ReturnView] = Field(default_factory=list)


class OrderPage(BaseModel):
    """A page of a customer's orders, newest first; ``next_cursor`` fetches the next one."""

    orders: list[OrderView]
    next_cursor: str | None = None


def encode_cursor(order: Order) -> str:
    """An opaque cursor pointing just after ``order``."""
    raw = json.dumps([order.placed_at.isoformat(), order.order_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> PageCursor:
    """Read a cursor made by :func:`encode_cursor`; ValueError if it is not one."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        placed_at, order_id = json.loads(base64.urlsafe_b64decode(padded))
        when = datetime.fromisoformat(placed_at)
    except Exception as exc:
        raise ValueError("invalid cursor") from exc
    if when.tzinfo is None or not isinstance(order_id, str):
        raise ValueError("invalid cursor")
    return PageCursor(when, order_id)
