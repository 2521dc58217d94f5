"""The order aggregate: its state machine, the reservation saga, fulfilment, returns, refunds.

Pure: no I/O, no clock (``now`` is passed in). Every method either refuses with an
:class:`~order_service.domain.errors.OrderError` and changes nothing, or applies its change
and appends the resulting ``order.lifecycle.v1`` events to :attr:`Order.events` for the
service layer to write to the outbox in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

from omni_contracts import (
    Allocation,
    Channel,
    CheckoutSubmitted,
    Fulfillment,
    FulfillmentType,
    Line,
    Money,
    OrderCancelled,
    OrderConfirmed,
    OrderDelayed,
    OrderDelivered,
    OrderEvent,
    OrderPickedUp,
    OrderPlaced,
    OrderReadyForPickup,
    OrderRejected,
    OrderReturnReceived,
    OrderShipped,
    OrderStatus,
    RefundIssued,
    ReturnLine,
    SaleRecorded,
    Shortage,
)

from order_service.domain.errors import (
    IllegalTransition,
    InvalidOrder,
    NothingToReturn,
    ReturnConflict,
)

S = OrderStatus

# --- the state machine -------------------------------------------------------------------

TRANSITIONS: Mapping[OrderStatus, frozenset[OrderStatus]] = {
    S.PLACED: frozenset({S.CONFIRMED, S.REJECTED, S.CANCELLED}),
    S.CONFIRMED: frozenset({S.READY_FOR_PICKUP, S.PICKED_UP, S.SHIPPED, S.CANCELLED}),
    S.READY_FOR_PICKUP: frozenset({S.PICKED_UP, S.CANCELLED}),
    S.PICKED_UP: frozenset({S.PARTIALLY_RETURNED, S.RETURNED}),
    # A courier return can reach a warehouse before (or instead of) a delivery scan.
    S.SHIPPED: frozenset({S.DELIVERED, S.PARTIALLY_RETURNED, S.RETURNED}),
    S.DELIVERED: frozenset({S.PARTIALLY_RETURNED, S.RETURNED}),
    # An in-store sale is born completed; all it can still do is come back.
    S.COMPLETED: frozenset({S.PARTIALLY_RETURNED, S.RETURNED}),
    S.PARTIALLY_RETURNED: frozenset({S.PARTIALLY_RETURNED, S.RETURNED}),
    S.RETURNED: frozenset({S.REFUNDED}),
    S.REJECTED: frozenset(),
    S.CANCELLED: frozenset(),
    S.REFUNDED: frozenset(),
}
"""Every allowed ``from -> to`` status change; anything else is an illegal transition."""

CANCELLABLE = frozenset(s for s, targets in TRANSITIONS.items() if S.CANCELLED in targets)
"""Statuses from which an order can still be cancelled (before fulfilment)."""

RETURNABLE = frozenset(s for s, targets in TRANSITIONS.items() if S.RETURNED in targets)
"""Statuses in which goods are with the shopper and can be handed back."""

TERMINAL = frozenset(s for s, targets in TRANSITIONS.items() if not targets)
"""Statuses an order never leaves."""


def can_transition(current: OrderStatus, wanted: OrderStatus) -> bool:
    """Whether the state machine allows ``current -> wanted``."""
    return wanted in TRANSITIONS[current]


# --- the saga ----------------------------------------------------------------------------

INVENTORY = "inventory"
"""Saga participant: inventory must reserve every line."""
LOYALTY = "loyalty"
"""Saga participant (once the loyalty service joins): loyalty must hold the redeemed points."""


def required_participants(
    points_to_redeem: int | None, *, loyalty_in_saga: bool = False
) -> frozenset[str]:
    """Who must say yes before an order is confirmed.

    Adding a participant is: name it here, and route its yes/no to
    :meth:`Order.participant_confirmed` / :meth:`Order.participant_rejected`.
    """
    participants = {INVENTORY}
    if loyalty_in_saga and points_to_redeem:
        participants.add(LOYALTY)
    return frozenset(participants)


def is_expiry(release_reason: str) -> bool:
    """Whether inventory released a reservation because it expired (not because we asked:
    those reasons start with ``order_cancelled:`` / ``order_rejected:``)."""
    reason = release_reason.strip().lower()
    return reason in {"expired", "reservation_expired"} or reason.startswith("expired")


# --- money -------------------------------------------------------------------------------

CENT = Decimal("0.01")


def refund_amount(
    *,
    returned_value: Decimal,
    gross: Decimal,
    paid: Decimal,
    refunded_before: Decimal,
    fully_returned: bool,
) -> Decimal:
    """The refund for goods worth ``returned_value`` (at order prices) handed back.

    Never more than was paid for goods: when the shopper paid less than the goods' value
    (e.g. points covered part of it) each return is refunded pro rata, rounded down to the
    cent, and the return that brings back the last unit refunds exactly what is left, so
    the refunds of any sequence of partial returns add up to what was paid, never more.
    """
    refundable = min(paid, gross)
    remaining = max(refundable - refunded_before, Decimal(0))
    if fully_returned:
        return remaining.quantize(CENT)
    if gross <= 0:
        return Decimal("0.00")
    share = (returned_value * refundable / gross).quantize(CENT, rounding=ROUND_DOWN)
    return min(share, remaining).quantize(CENT)


def fingerprint(payload: Any) -> str:
    """A stable hash of a JSON-able payload (idempotency keys compare request bodies)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- the aggregate -----------------------------------------------------------------------


@dataclass
class OrderLine:
    """One line of an order and how many of its units came back."""

    line_no: int
    sku: str
    qty: int
    unit_price: Decimal
    returned_qty: int = 0

    @property
    def returnable(self) -> int:
        """Units still with the shopper."""
        return self.qty - self.returned_qty

    @property
    def value(self) -> Decimal:
        """The line's value at order prices."""
        return self.unit_price * self.qty


@dataclass(frozen=True)
class ReturnRecord:
    """One return handed in, as accepted (lines clamped to what was still returnable)."""

    return_id: str
    location_id: str
    channel: Channel
    lines: tuple[ReturnLine, ...]
    refund: Decimal
    fingerprint: str
    received_at: datetime
    not_accepted: tuple[ReturnLine, ...] = ()


@dataclass
class Order:
    """An order of any channel, from placement (or an in-store sale) to refund."""

    order_id: str
    customer_id: str | None
    channel: Channel
    status: OrderStatus
    lines: list[OrderLine]
    fulfillment: Fulfillment
    currency: str
    total: Decimal
    paid: Decimal
    placed_at: datetime
    correlation_id: str
    checkout_id: str | None = None
    sale_id: str | None = None
    cart_id: str | None = None
    payment_reference: str | None = None
    points_to_redeem: int | None = None
    pending_confirmations: set[str] = field(default_factory=set)
    # Only known while the order is being placed or confirmed (not persisted): what the
    # payment authorised, and the till's loyalty card of an in-store sale.
    authorized: Decimal | None = None
    loyalty_card: str | None = None
    allocations: list[Allocation] = field(default_factory=list)
    shortages: list[Shortage] = field(default_factory=list)
    reason: str | None = None
    carrier: str | None = None
    tracking_id: str | None = None
    promised_by: datetime | None = None
    eta: datetime | None = None
    announced_etas: set[datetime] = field(default_factory=set)
    collect_by: datetime | None = None
    refunded: Decimal = Decimal("0.00")
    # return_id -> fingerprint of every return already handled
    returns: dict[str, str] = field(default_factory=dict)
    version: int = 0

    # Unsaved consequences, drained by the service layer.
    events: list[OrderEvent] = field(default_factory=list, repr=False)
    transitions: list[OrderStatus] = field(default_factory=list, repr=False)
    new_returns: list[ReturnRecord] = field(default_factory=list, repr=False)
    notes: list[tuple[str, str]] = field(default_factory=list, repr=False)

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def from_checkout(
        cls,
        checkout: CheckoutSubmitted,
        *,
        order_id: str,
        correlation_id: str,
        participants: Iterable[str],
        now: datetime,
    ) -> Order:
        """A new order for a submitted checkout, awaiting its saga participants."""
        lines = _order_lines(checkout.lines)
        gross = sum((line.value for line in lines), Decimal(0))
        due = checkout.total.amount if checkout.total is not None else gross
        authorized = checkout.payment.authorized.amount
        participants = frozenset(participants)
        # Points pay part of the bill only when loyalty holds them in the saga: then the
        # check waits for loyalty's yes, which says what the held points are worth
        # (participant_confirmed). Without loyalty in the saga the payment alone must cover.
        if not (checkout.points_to_redeem and LOYALTY in participants) and authorized < due:
            raise InvalidOrder(
                f"payment authorised {authorized} {checkout.payment.authorized.currency}"
                f" does not cover the order total {due}"
            )
        order = cls(
            order_id=order_id,
            customer_id=checkout.customer_id,
            channel=checkout.channel,
            status=S.PLACED,
            lines=lines,
            fulfillment=checkout.fulfillment,
            currency=checkout.payment.authorized.currency,
            total=due,
            paid=min(authorized, due),
            placed_at=checkout.occurred_at,
            correlation_id=correlation_id,
            checkout_id=checkout.checkout_id,
            cart_id=checkout.cart_id,
            payment_reference=checkout.payment.reference,
            points_to_redeem=checkout.points_to_redeem,
            pending_confirmations=set(participants),
            authorized=authorized,
        )
        if not order.pending_confirmations:
            raise InvalidOrder("an order needs at least one saga participant")
        order.transitions.append(S.PLACED)
        order._emit(OrderPlaced(**order._placed_fields(now)))
        return order

    @classmethod
    def from_store_sale(
        cls, sale: SaleRecorded, *, order_id: str, correlation_id: str, now: datetime
    ) -> Order:
        """An in-store sale as an order born completed (picked up at the till).

        Its ``order.placed`` says ``status=completed`` and ``channel=store``: the stock left
        the shelf with the sale itself, so nobody reserves anything for it.
        """
        lines = _order_lines(sale.lines)
        gross = sum((line.value for line in lines), Decimal(0))
        order = cls(
            order_id=order_id,
            customer_id=sale.customer_id,
            channel=Channel.STORE,
            status=S.COMPLETED,
            lines=lines,
            fulfillment=Fulfillment(type=FulfillmentType.PICKUP, location_id=sale.location_id),
            currency=sale.lines[0].unit_price.currency,
            total=sale.total.amount if sale.total is not None else gross,
            paid=sale.total.amount if sale.total is not None else gross,
            placed_at=sale.occurred_at,
            correlation_id=correlation_id,
            sale_id=sale.sale_id,
            loyalty_card=sale.loyalty_card,
        )
        order.transitions.append(S.COMPLETED)
        order._emit(OrderPlaced(**order._placed_fields(now)))
        return order

    # -- derived values -------------------------------------------------------------------

    @property
    def gross(self) -> Decimal:
        """The goods' value at order prices."""
        return sum((line.value for line in self.lines), Decimal(0))

    @property
    def fully_returned(self) -> bool:
        """Whether every unit came back."""
        return all(line.returnable == 0 for line in self.lines)

    def money(self, amount: Decimal) -> Money:
        """``amount`` in this order's currency."""
        return Money(amount=amount.quantize(CENT), currency=self.currency)

    # -- the saga -------------------------------------------------------------------------

    def participant_confirmed(
        self,
        participant: str,
        now: datetime,
        *,
        allocations: Sequence[Allocation] | None = None,
        points_value: Decimal | None = None,
    ) -> bool:
        """A participant said yes; the order is confirmed once all of them have.

        Loyalty's yes carries ``points_value``, what the held points are worth: the payment
        must cover the rest (``paid >= total - points_value``), else the order is rejected
        with ``payment_insufficient`` (loyalty then releases the points). What the shopper
        pays in money becomes ``total - points_value``, the most any refund gives back.

        A late or repeated answer (the order was rejected or cancelled meanwhile) changes
        nothing and returns False: the rejection or cancellation already told everyone to
        undo their part.
        """
        if self.status is not S.PLACED or participant not in self.pending_confirmations:
            return False
        if participant == LOYALTY:
            value = points_value if points_value is not None else Decimal(0)
            money_due = max(self.total - value, Decimal(0))
            # ``paid`` is min(authorised, total) since placement: it covers iff this holds.
            if self.paid < money_due:
                return self.participant_rejected(LOYALTY, "payment_insufficient", now)
            self.paid = money_due.quantize(CENT)
        self.pending_confirmations.discard(participant)
        if allocations is not None:
            self.allocations = list(allocations)
        if not self.pending_confirmations:
            self._move(S.CONFIRMED)
            self._emit(
                OrderConfirmed(
                    **self._base(now),
                    promised_by=self.promised_by,
                    # Optional extra (the contract allows additions): where the stock is held.
                    allocations=[a.model_dump(mode="json") for a in self.allocations],
                )
            )
        return True

    def participant_rejected(
        self,
        participant: str,
        reason: str,
        now: datetime,
        *,
        shortages: Sequence[Shortage] = (),
    ) -> bool:
        """A participant said no: the first no rejects the order. Late answers change nothing."""
        if self.status is not S.PLACED:
            return False
        self._move(S.REJECTED)
        self.reason = reason
        self.shortages = list(shortages)
        self.pending_confirmations.clear()
        self._emit(
            OrderRejected(
                **self._base(now),
                reason=reason,
                shortages=list(shortages) or None,
                # Optional extra: who said no (inventory today, loyalty later).
                participant=participant,
            )
        )
        return True

    def reservation_released(self, reason: str, now: datetime) -> bool:
        """Inventory gave the stock back. Only an expiry concerns us: an order still waiting
        is rejected, a confirmed one (no longer backed by stock) is cancelled."""
        if not is_expiry(reason):
            return False  # released because we cancelled or rejected: already accounted for
        if self.status is S.PLACED:
            return self.participant_rejected(INVENTORY, "reservation_expired", now)
        if self.status in (S.CONFIRMED, S.READY_FOR_PICKUP):
            return self.cancel("reservation_expired", now)
        return False

    # -- cancellation ---------------------------------------------------------------------

    def cancel(self, reason: str, now: datetime) -> bool:
        """Cancel before fulfilment; False if it already is cancelled.

        Raises :class:`IllegalTransition` once the order is shipped, collected, rejected...
        """
        if self.status is S.CANCELLED:
            return False
        self._move(S.CANCELLED)
        self.reason = reason
        self.pending_confirmations.clear()
        self._emit(OrderCancelled(**self._base(now), reason=reason))
        return True

    def note(self, what: str, detail: str) -> None:
        """Record something in the order's history that is not a status change."""
        self.notes.append((what, detail))

    # -- fulfilment -----------------------------------------------------------------------

    def ready_for_pickup(
        self,
        now: datetime,
        *,
        window: timedelta,
        location_id: str | None = None,
        collect_by: datetime | None = None,
    ) -> bool:
        """The store packed the order; the shopper has until ``collect_by`` to collect it."""
        if self.status is S.READY_FOR_PICKUP:
            return False
        self._require_fulfillment(FulfillmentType.PICKUP, S.READY_FOR_PICKUP)
        self._move(S.READY_FOR_PICKUP)
        self.collect_by = collect_by or now + window
        self._emit(
            OrderReadyForPickup(
                **self._base(now),
                location_id=location_id or self.fulfillment.location_id,
                collect_by=self.collect_by,
            )
        )
        return True

    def picked_up(self, now: datetime, *, location_id: str | None = None) -> bool:
        """The shopper collected the order."""
        if self.status is S.PICKED_UP:
            return False
        self._require_fulfillment(FulfillmentType.PICKUP, S.PICKED_UP)
        self._move(S.PICKED_UP)
        self._emit(
            OrderPickedUp(
                **self._base(now), location_id=location_id or self.fulfillment.location_id
            )
        )
        return True

    def pickup_not_collected(self, now: datetime) -> bool:
        """The collection window closed: cancel, so the stock goes back on sale."""
        if self.status is not S.READY_FOR_PICKUP:
            return False
        return self.cancel("not_collected", now)

    def shipped(
        self, now: datetime, *, carrier: str, tracking_id: str, promised_by: datetime
    ) -> bool:
        """The order left with a carrier, promised to arrive by ``promised_by``."""
        if self.status is S.SHIPPED:
            return False
        self._require_fulfillment(FulfillmentType.DELIVERY, S.SHIPPED)
        self._move(S.SHIPPED)
        self.carrier, self.tracking_id, self.promised_by = carrier, tracking_id, promised_by
        self._emit(
            OrderShipped(
                **self._base(now),
                carrier=carrier,
                tracking_id=tracking_id,
                promised_by=promised_by,
            )
        )
        return True

    def eta_changed(self, eta: datetime, now: datetime) -> bool:
        """A carrier's new ETA; past the promise it is announced once (per distinct ETA)."""
        if self.status not in (S.PLACED, S.CONFIRMED, S.SHIPPED):
            return False  # delivered, cancelled...: an old estimate no longer matters
        self.eta = eta
        if self.promised_by is None or eta <= self.promised_by:
            return False
        return self._announce_delay(eta, now)

    def promise_overdue(self, now: datetime, *, extension: timedelta) -> bool:
        """The promised time passed with no delivery: tell the shopper, unless already told.

        The new ETA is the carrier's when it has one past the promise, else an estimate
        ``extension`` after the promise (or now, if later).
        """
        if self.status is not S.SHIPPED or self.promised_by is None:
            return False
        if self.eta is not None and self.eta > self.promised_by:
            eta = self.eta
        else:
            eta = max(now, self.promised_by) + extension
        return self._announce_delay(eta, now)

    def delivered(self, now: datetime) -> bool:
        """The carrier delivered the order."""
        if self.status is S.DELIVERED:
            return False
        self._move(S.DELIVERED)
        self._emit(OrderDelivered(**self._base(now)))
        return True

    # -- returns and refunds --------------------------------------------------------------

    def receive_return(
        self,
        *,
        return_id: str,
        location_id: str,
        channel: Channel,
        lines: Sequence[ReturnLine],
        now: datetime,
    ) -> bool:
        """Goods handed back at ``location_id``: record them and refund their value.

        Units beyond what is still with the shopper are not accepted (and not refunded);
        a ``return_id`` seen before has no second effect (False), unless its content
        differs, which is a :class:`ReturnConflict`.
        """
        digest = fingerprint(
            {
                "location_id": location_id,
                "lines": sorted((line.sku, line.qty, line.resellable) for line in lines),
            }
        )
        if return_id in self.returns:
            if self.returns[return_id] == digest:
                return False
            raise ReturnConflict(f"return {return_id} was received before with other content")
        if self.status not in RETURNABLE:
            raise IllegalTransition(self.order_id, self.status, S.RETURNED, "nothing delivered")
        accepted, refused, value = self._take_back(lines)
        if not accepted:
            raise NothingToReturn(
                f"order {self.order_id} has none of {[line.sku for line in lines]} left to return"
            )
        fully = self.fully_returned
        returned_status = S.RETURNED if fully else S.PARTIALLY_RETURNED
        self._move(returned_status)
        self._emit(
            OrderReturnReceived(
                **self._base(now),
                status=returned_status,
                return_id=return_id,
                location_id=location_id,
                lines=accepted,
            )
        )
        refund = refund_amount(
            returned_value=value,
            gross=self.gross,
            paid=self.paid,
            refunded_before=self.refunded,
            fully_returned=fully,
        )
        if refund > 0:
            self.refunded += refund
            final = S.REFUNDED if fully else S.PARTIALLY_RETURNED
            if final is not self.status:
                self._move(final)
            self._emit(
                RefundIssued(
                    **self._base(now),
                    status=final,
                    return_id=return_id,
                    amount=self.money(refund),
                )
            )
        self.returns[return_id] = digest
        self.new_returns.append(
            ReturnRecord(
                return_id=return_id,
                location_id=location_id,
                channel=channel,
                lines=tuple(accepted),
                refund=refund,
                fingerprint=digest,
                received_at=now,
                not_accepted=tuple(refused),
            )
        )
        return True

    def _take_back(
        self, lines: Sequence[ReturnLine]
    ) -> tuple[list[ReturnLine], list[ReturnLine], Decimal]:
        accepted: list[ReturnLine] = []
        refused: list[ReturnLine] = []
        value = Decimal(0)
        for returned in lines:
            wanted = returned.qty
            for line in self.lines:
                if wanted == 0:
                    break
                if line.sku != returned.sku or line.returnable == 0:
                    continue
                take = min(wanted, line.returnable)
                line.returned_qty += take
                value += line.unit_price * take
                wanted -= take
            if returned.qty - wanted:
                accepted.append(returned.model_copy(update={"qty": returned.qty - wanted}))
            if wanted:
                refused.append(returned.model_copy(update={"qty": wanted}))
        return accepted, refused, value

    # -- internals ------------------------------------------------------------------------

    def _move(self, wanted: OrderStatus) -> None:
        if not can_transition(self.status, wanted):
            raise IllegalTransition(self.order_id, self.status, wanted)
        self.status = wanted
        self.transitions.append(wanted)

    def _require_fulfillment(self, kind: FulfillmentType, wanted: OrderStatus) -> None:
        if self.fulfillment.type is not kind:
            raise IllegalTransition(
                self.order_id, self.status, wanted, f"a {self.fulfillment.type} order"
            )

    def _announce_delay(self, eta: datetime, now: datetime) -> bool:
        if eta in self.announced_etas or self.promised_by is None:
            return False
        self.announced_etas.add(eta)
        self._emit(
            OrderDelayed(
                **self._base(now),
                status=self.status,
                promised_by=self.promised_by,
                eta=eta,
            )
        )
        return True

    def _emit(self, event: OrderEvent) -> None:
        self.events.append(event)

    def _base(self, now: datetime) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "customer_id": self.customer_id,
            "channel": self.channel,
            "occurred_at": now,
        }

    def _placed_fields(self, now: datetime) -> dict[str, Any]:
        return {
            **self._base(now),
            "status": self.status,
            "lines": [
                Line(sku=line.sku, qty=line.qty, unit_price=self.money(line.unit_price))
                for line in self.lines
            ],
            "fulfillment": self.fulfillment,
            "total": self.money(self.total),
            "checkout_id": self.checkout_id,
            "cart_id": self.cart_id,
            "sale_id": self.sale_id,
            "points_to_redeem": self.points_to_redeem,
            "loyalty_card": self.loyalty_card,
            "awaiting": sorted(self.pending_confirmations) or None,
        }


def _order_lines(lines: Sequence[Line]) -> list[OrderLine]:
    return [
        OrderLine(line_no=i, sku=line.sku, qty=line.qty, unit_price=line.unit_price.amount)
        for i, line in enumerate(lines, start=1)
    ]
