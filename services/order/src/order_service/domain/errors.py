"""What the order domain refuses, as exceptions the service layer maps to 4xx or the DLQ."""

from __future__ import annotations

from omni_common.handlers import Refusal
from omni_contracts import OrderStatus


class OrderError(Refusal):
    """Base of every refusal by the order domain; ``reason`` is a stable machine word."""

    reason = "order_error"

    def __init__(self, message: str) -> None:
        super().__init__(type(self).reason, message)
        self.message = message


class InvalidOrder(OrderError):
    """A checkout or sale that cannot become an order (e.g. payment does not cover it)."""

    reason = "invalid_order"


class IllegalTransition(OrderError):
    """A status change the state machine does not allow; refused and counted, never applied."""

    reason = "illegal_transition"

    def __init__(self, order_id: str, current: OrderStatus, wanted: OrderStatus, why: str = ""):
        detail = f" ({why})" if why else ""
        super().__init__(f"order {order_id}: {current} -> {wanted} is not allowed{detail}")
        self.order_id = order_id
        self.current = current
        self.wanted = wanted


class ReturnConflict(OrderError):
    """A ``return_id`` seen before with different content."""

    reason = "return_conflict"


class NothingToReturn(OrderError):
    """A return whose lines match nothing still returnable on the order."""

    reason = "nothing_to_return"


class OrderNotFound(OrderError):
    """An event or request names an order this service does not know."""

    reason = "unknown_order"


class IdempotencyConflict(OrderError):
    """An idempotency key (``checkout_id``, ``Idempotency-Key``, ``sale_id``) reused with
    a different request."""

    reason = "idempotency_conflict"
