"""Events the platform produces for channels (and for its own services).

Required fields are exactly those CONTRACT.md names. Events for which the contract names no
time field carry ``occurred_at``, set by the producing service.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from omni_contracts.base import (
    INT4_MAX,
    MAX_LINES,
    Channel,
    Event,
    Money,
    NonEmptyStr,
    Quantity,
    SignedCount,
    UtcDatetime,
    utcnow,
)
from omni_contracts.common import (
    CART_ABANDONED,
    CUSTOMER_PROFILE,
    INVENTORY_AVAILABILITY,
    INVENTORY_RESERVATIONS,
    LOYALTY_LEDGER,
    NOTIFICATION_DISPATCHED,
    ORDER_LIFECYCLE,
    Allocation,
    Fulfillment,
    Line,
    NotificationChannel,
    Preferences,
    PushSubscription,
    ReturnLine,
    Shortage,
    single_currency,
)

# --- inventory.availability.v1 -----------------------------------------------------------


class AvailabilityStatus(StrEnum):
    """What a shopper is told about a SKU at a location."""

    IN_STOCK = "in_stock"
    LOW_STOCK = "low_stock"
    OUT_OF_STOCK = "out_of_stock"


class AvailabilityCause(StrEnum):
    """What made availability change."""

    SALE = "sale"
    RESERVATION = "reservation"
    RELEASE = "release"
    ADJUSTMENT = "adjustment"
    RETURN = "return"
    FULFILLMENT = "fulfillment"


class AvailabilityChanged(Event):
    """The sellable stock of a SKU at a location changed.

    Produced by inventory after a sale, reservation, release, adjustment, return or
    fulfilment. Web and app show ``status`` per store and sell up to ``online_available`` for
    delivery; notification sends back-in-stock alerts. Keyed by SKU, so ``online_available``
    never goes back in time.

    ``version`` (optional, additive) counts the availability changes of the SKU, across its
    locations, in the order they happened: a consumer that sees one again after a
    redelivery or a replay, or reads from several sources, drops any with a ``version`` not
    above the last it applied for that SKU.
    """

    topic = INVENTORY_AVAILABILITY
    ce_type = "inventory.availability.changed"
    key_field = "sku"

    sku: NonEmptyStr
    location_id: NonEmptyStr
    on_hand: Quantity
    reserved: Quantity
    available: Quantity
    status: AvailabilityStatus
    previous_status: AvailabilityStatus
    online_available: Quantity
    cause: AvailabilityCause
    changed_at: UtcDatetime
    safety_stock: Quantity | None = None
    version: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _available_is_on_hand(self) -> AvailabilityChanged:
        # Reserved units and safety stock only ever take away from what is on hand.
        if self.available > self.on_hand:
            raise ValueError("available cannot exceed on_hand")
        return self


# --- inventory.reservations.v1 -----------------------------------------------------------


class ReservationEvent(Event):
    """Base of reservation outcomes for one order."""

    topic = INVENTORY_RESERVATIONS
    key_field = "order_id"

    order_id: NonEmptyStr
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class ReservationConfirmed(ReservationEvent):
    """Inventory reserved every line of an order, at the locations in ``allocations``.

    Produced by inventory in answer to an order's reservation. Order confirms the order; the
    reservation lapses at ``expires_at`` unless the order is fulfilled first.
    """

    ce_type = "inventory.reservation.confirmed"

    allocations: list[Allocation] = Field(min_length=1, max_length=10 * MAX_LINES)
    expires_at: UtcDatetime


class ReservationRejected(ReservationEvent):
    """Inventory could not reserve an order; nothing was reserved.

    Produced by inventory. Order rejects the order and releases the payment; ``shortages``
    lists the SKUs that were short (and is empty when the reason is not a shortage).
    """

    ce_type = "inventory.reservation.rejected"

    reason: NonEmptyStr
    shortages: list[Shortage] = Field(max_length=MAX_LINES)


class ReservationReleased(ReservationEvent):
    """Inventory gave back the units reserved for an order.

    Produced by inventory when the order is cancelled or the reservation expires
    (``reason``). Order and web/app see the units become sellable again.
    """

    ce_type = "inventory.reservation.released"

    reason: NonEmptyStr
    allocations: list[Allocation] | None = Field(default=None, max_length=10 * MAX_LINES)


# --- order.lifecycle.v1 ------------------------------------------------------------------


class OrderStatus(StrEnum):
    """Where an order stands in its lifecycle."""

    PLACED = "placed"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    READY_FOR_PICKUP = "ready_for_pickup"
    PICKED_UP = "picked_up"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    PARTIALLY_RETURNED = "partially_returned"
    RETURNED = "returned"
    REFUNDED = "refunded"


class OrderEvent(Event):
    """Base of order lifecycle events: every one says whose order it is, from which channel,
    and the order's ``status`` after the event (each event type narrows the statuses)."""

    topic = ORDER_LIFECYCLE
    key_field = "order_id"

    order_id: NonEmptyStr
    # Always present, null for an anonymous in-store sale.
    customer_id: NonEmptyStr | None
    channel: Channel
    status: OrderStatus
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class OrderPlaced(OrderEvent):
    """An order was accepted and awaits its stock reservation.

    Produced by order for a checkout, and for an in-store sale, which is born ``completed``
    with a pickup fulfilment at the store. Customer-profile adds it to the purchase history;
    loyalty earns points for completed orders.
    """

    ce_type = "order.placed"
    status: Literal[OrderStatus.PLACED, OrderStatus.COMPLETED] = OrderStatus.PLACED

    lines: list[Line] = Field(min_length=1, max_length=MAX_LINES)
    fulfillment: Fulfillment
    total: Money | None = None
    checkout_id: NonEmptyStr | None = None
    cart_id: NonEmptyStr | None = None
    sale_id: NonEmptyStr | None = None
    points_to_redeem: Quantity | None = None
    # An in-store sale's loyalty card (loyalty credits a card not yet linked to a customer).
    loyalty_card: NonEmptyStr | None = None
    # The saga participants whose yes the order waits for (e.g. ["inventory", "loyalty"]):
    # loyalty holds points only for an order that waits for it.
    awaiting: list[NonEmptyStr] | None = None

    @model_validator(mode="after")
    def _one_currency(self) -> OrderPlaced:
        single_currency([*(line.unit_price for line in self.lines), self.total])
        return self


class OrderConfirmed(OrderEvent):
    """Stock for every line of an order is reserved; it will be fulfilled.

    Produced by order after inventory confirmed the reservation. Notification confirms it to
    the shopper; loyalty turns held points into redeemed ones.
    """

    ce_type = "order.confirmed"
    status: Literal[OrderStatus.CONFIRMED] = OrderStatus.CONFIRMED

    promised_by: UtcDatetime | None = None


class OrderRejected(OrderEvent):
    """An order could not be accepted (e.g. out of stock); the payment is released.

    Produced by order. Notification tells the shopper; loyalty releases held points.
    """

    ce_type = "order.rejected"
    status: Literal[OrderStatus.REJECTED] = OrderStatus.REJECTED

    reason: NonEmptyStr
    shortages: list[Shortage] | None = Field(default=None, max_length=MAX_LINES)


class OrderReadyForPickup(OrderEvent):
    """An order waits for the shopper at a store.

    Produced by order when the store reports it packed. Notification tells the shopper where
    and until when to collect it.
    """

    ce_type = "order.ready_for_pickup"
    status: Literal[OrderStatus.READY_FOR_PICKUP] = OrderStatus.READY_FOR_PICKUP

    location_id: NonEmptyStr | None = None
    collect_by: UtcDatetime | None = None


class OrderPickedUp(OrderEvent):
    """The shopper collected an order at a store.

    Produced by order. Loyalty earns points; customer-profile updates the purchase history.
    """

    ce_type = "order.picked_up"
    status: Literal[OrderStatus.PICKED_UP] = OrderStatus.PICKED_UP

    location_id: NonEmptyStr | None = None


class OrderShipped(OrderEvent):
    """An order left with a carrier.

    Produced by order. Notification sends the tracking link to the shopper.
    """

    ce_type = "order.shipped"
    status: Literal[OrderStatus.SHIPPED] = OrderStatus.SHIPPED

    carrier: NonEmptyStr | None = None
    tracking_id: NonEmptyStr | None = None
    promised_by: UtcDatetime | None = None


class OrderDelivered(OrderEvent):
    """A carrier delivered an order.

    Produced by order. Loyalty earns points; customer-profile updates the purchase history.
    """

    ce_type = "order.delivered"
    status: Literal[OrderStatus.DELIVERED] = OrderStatus.DELIVERED


class OrderDelayed(OrderEvent):
    """An order will arrive after the time promised to the shopper.

    Produced by order when a carrier's new ``eta`` passes ``promised_by``, or the promise
    passes with no delivery. Notification apologises to the shopper. ``status`` is unchanged
    by the delay.
    """

    ce_type = "order.delayed"
    # A delay does not move the order: the status is where it stands, with no default.
    status: Literal[OrderStatus.PLACED, OrderStatus.CONFIRMED, OrderStatus.SHIPPED]

    promised_by: UtcDatetime
    eta: UtcDatetime

    @model_validator(mode="after")
    def _eta_is_late(self) -> OrderDelayed:
        if self.eta <= self.promised_by:
            raise ValueError("a delayed order needs eta after promised_by")
        return self


class OrderCancelled(OrderEvent):
    """An order was cancelled before fulfilment; its stock reservation is released.

    Produced by order after a cancellation request or an uncollected pickup. Inventory
    releases the reservation; loyalty releases held points; notification tells the shopper.
    """

    ce_type = "order.cancelled"
    status: Literal[OrderStatus.CANCELLED] = OrderStatus.CANCELLED

    reason: NonEmptyStr


class OrderReturnReceived(OrderEvent):
    """Items of an order came back, at a store or a warehouse.

    Produced by order when a return is received. Loyalty reverses points for the returned
    lines; a refund follows as ``order.refund_issued``.
    """

    ce_type = "order.return_received"
    status: Literal[OrderStatus.RETURNED, OrderStatus.PARTIALLY_RETURNED] = OrderStatus.RETURNED

    return_id: NonEmptyStr
    location_id: NonEmptyStr
    lines: list[ReturnLine] = Field(min_length=1, max_length=MAX_LINES)


class RefundIssued(OrderEvent):
    """Money was refunded to the shopper for a return.

    Produced by order. Notification confirms the refund to the shopper.
    """

    ce_type = "order.refund_issued"
    # Refunding part of a return may leave the order (partially) returned rather than refunded.
    status: Literal[OrderStatus.REFUNDED, OrderStatus.PARTIALLY_RETURNED, OrderStatus.RETURNED] = (
        OrderStatus.REFUNDED
    )

    return_id: NonEmptyStr
    amount: Money


# --- customer.profile.v1 -----------------------------------------------------------------


class ProfileEvent(Event):
    """Base of profile events (log-compacted: the last one per customer is the profile)."""

    topic = CUSTOMER_PROFILE
    key_field = "customer_id"

    customer_id: NonEmptyStr
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class ProfileUpdated(ProfileEvent):
    """A shopper's profile changed; this is the full profile, not a diff.

    Produced by customer-profile after any change. The topic is log-compacted, so the last
    snapshot per ``customer_id`` is the profile: notification keeps its contact list from it,
    channels their local copies.
    """

    ce_type = "customer.profile.updated"

    # Grows with every snapshot of one customer, so a consumer can drop stale ones.
    version: Quantity | None = None
    email: str | None = None
    phone: str | None = None
    push_tokens: list[str] = Field(default_factory=list)
    # Browsers' Web Push subscriptions, one per device the shopper registered.
    push_subscriptions: list[PushSubscription] = Field(default_factory=list)
    first_name: str | None = None
    last_name: str | None = None
    anonymous_ids: list[str] = Field(default_factory=list)
    loyalty_card: str | None = None
    # Every identifier known for the shopper (``email``/``phone``/``loyalty_card`` above are
    # the primary ones).
    emails: list[str] = Field(default_factory=list)
    phones: list[str] = Field(default_factory=list)
    loyalty_cards: list[str] = Field(default_factory=list)
    tier: str | None = None
    preferences: Preferences = Field(default_factory=Preferences)
    preferred_store: str | None = None


class ProfilesMerged(ProfileEvent):
    """Profiles found to belong to one shopper were merged into ``surviving_id``.

    Produced by customer-profile. Keyed by the surviving id (``customer_id`` equals
    ``surviving_id``); consumers move whatever they hold for ``merged_ids`` to it. A fresh
    ``customer.profile.updated`` of the survivor follows, so compaction keeps the profile.
    Merges happen only on proof (a login, a loyalty card at a till, a verified e-mail or
    phone; never a typed, unverified address), are kept in the profile's identity log
    (``GET /customers/{id}/identity-log``) and can be undone (``customer.profiles.unmerged``).
    Consent survives a merge: per channel and purpose the most restrictive answer of either
    profile stands until the shopper answers again.
    """

    ce_type = "customer.profiles.merged"

    surviving_id: NonEmptyStr
    merged_ids: list[NonEmptyStr] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _key_is_survivor(cls, data: Any) -> Any:
        # The contract names surviving_id; the topic's key is customer_id: keep both, equal.
        if isinstance(data, dict) and data.get("customer_id") is None:
            return {**data, "customer_id": data.get("surviving_id")}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ProfilesMerged:
        if self.customer_id != self.surviving_id:
            raise ValueError("customer_id must equal surviving_id")
        if self.surviving_id in self.merged_ids:
            raise ValueError("surviving_id cannot be among merged_ids")
        return self


class ProfilesUnmerged(ProfileEvent):
    """A merge found wrong was undone: ``restored_id`` is a profile of its own again.

    Produced by customer-profile after ``customer.profiles.unmerge.requested``. Keyed by the
    surviving id (``customer_id`` equals ``surviving_id``). The restored profile has back the
    identifiers, contact, consents, carts and history that were its own; consumers move back
    what they hold under ``restored_id`` (loyalty: the points earned, held or redeemed under
    it; notification: its contacts and history). Fresh ``customer.profile.updated``
    snapshots of both follow, the restored one under its own key.
    """

    ce_type = "customer.profiles.unmerged"

    surviving_id: NonEmptyStr
    restored_id: NonEmptyStr
    reason: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _key_is_survivor(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("customer_id") is None:
            return {**data, "customer_id": data.get("surviving_id")}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ProfilesUnmerged:
        if self.customer_id != self.surviving_id:
            raise ValueError("customer_id must equal surviving_id")
        if self.surviving_id == self.restored_id:
            raise ValueError("restored_id must differ from surviving_id")
        return self


class ProfileErased(ProfileEvent):
    """A shopper's personal data was erased on request.

    Produced by customer-profile after ``customer.erasure.requested``. Every service and
    channel deletes what it holds about ``customer_id``.
    """

    ce_type = "customer.profile.erased"


# --- cart.abandoned.v1 -------------------------------------------------------------------


class CartAbandoned(Event):
    """A known shopper left a cart untouched long enough to remind them of it.

    Produced by customer-profile when a cart's abandonment timer fires. Notification sends a
    reminder on the shopper's preferred channel, at a decent hour.
    """

    topic = CART_ABANDONED
    ce_type = "cart.abandoned"
    key_field = "cart_id"

    cart_id: NonEmptyStr
    customer_id: NonEmptyStr
    channel: Channel
    items: list[Line] = Field(min_length=1, max_length=MAX_LINES)
    value: Money
    last_activity_at: UtcDatetime
    occurred_at: UtcDatetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _one_currency(self) -> CartAbandoned:
        single_currency([*(item.unit_price for item in self.items), self.value])
        return self


# --- loyalty.ledger.v1 -------------------------------------------------------------------


class LedgerEvent(Event):
    """Base of loyalty ledger entries: ``points`` is the signed change, ``balance`` the
    spendable balance after it."""

    topic = LOYALTY_LEDGER
    key_field = "customer_id"
    # The sign ``points`` must have: +1 or -1; 0 leaves it to the event type.
    points_sign: ClassVar[int] = 0

    customer_id: NonEmptyStr
    points: SignedCount
    # Signed: reversing points already spent can take a balance below zero.
    balance: SignedCount
    reason: NonEmptyStr
    order_id: NonEmptyStr | None = None
    entry_id: NonEmptyStr | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _points_sign(self) -> LedgerEvent:
        sign = self.points_sign
        if sign and self.points * sign <= 0:
            wanted = "positive" if sign > 0 else "negative"
            raise ValueError(f"{self.ce_type} needs {wanted} points")
        return self


class PointsEarned(LedgerEvent):
    """A shopper earned points for a purchase.

    Produced by loyalty for completed orders and in-store sales. Channels show the new
    balance; notification may tell the shopper.
    """

    ce_type = "loyalty.points.earned"
    points_sign = +1


class PointsPending(LedgerEvent):
    """Points were earned but are not spendable until the return window closes.

    Produced by loyalty with the earn; ``loyalty.points.available`` follows when the window
    closes, or ``loyalty.points.reversed`` if the items come back first. ``balance`` is the
    spendable balance, which pending points do not change.
    """

    ce_type = "loyalty.points.pending"
    points_sign = +1


class PointsAvailable(LedgerEvent):
    """Pending points became spendable (the return window closed).

    Produced by loyalty by a durable timer.
    """

    ce_type = "loyalty.points.available"
    points_sign = +1


class PointsHeld(LedgerEvent):
    """Points were set aside for a checkout that redeems them.

    Produced by loyalty for ``points_to_redeem``; they are redeemed when the order is
    confirmed or released if it is rejected or cancelled.
    """

    ce_type = "loyalty.points.held"
    points_sign = -1

    # What the held points are worth against the order (points x value per point): the
    # order service checks that payment plus this covers what is due.
    value: Money | None = None


class RefusalReason(StrEnum):
    """Why loyalty refused to hold points for a checkout."""

    INSUFFICIENT_POINTS = "insufficient_points"
    UNKNOWN_MEMBER = "unknown_member"


class PointsRefused(LedgerEvent):
    """Loyalty could not hold the points a checkout wants to redeem; the order is rejected.

    Produced by loyalty for an order awaiting it whose shopper has too few spendable points
    (``insufficient_points``) or no loyalty account (``unknown_member``). ``points`` is 0;
    ``requested`` says how many were asked for. The order service rejects the order.
    """

    ce_type = "loyalty.points.refused"

    points: int = 0
    reason: RefusalReason
    requested: Quantity | None = None


class PointsRedeemed(LedgerEvent):
    """Points were spent on an order.

    Produced by loyalty when the order is confirmed. When the points were held first,
    ``points`` is 0 (the hold already took them from the balance).
    """

    ce_type = "loyalty.points.redeemed"

    @model_validator(mode="after")
    def _not_positive(self) -> PointsRedeemed:
        if self.points > 0:
            raise ValueError("loyalty.points.redeemed cannot add points")
        return self


class PointsReleased(LedgerEvent):
    """Held points went back to the shopper's balance.

    Produced by loyalty when the order that held them is rejected or cancelled.
    """

    ce_type = "loyalty.points.released"
    points_sign = +1


class PointsReversed(LedgerEvent):
    """Points were taken back (earned on returned items) or given back (redeemed on them).

    Produced by loyalty after a return or a correction.
    """

    ce_type = "loyalty.points.reversed"

    @model_validator(mode="after")
    def _non_zero(self) -> PointsReversed:
        if self.points == 0:
            raise ValueError("loyalty.points.reversed needs non-zero points")
        return self


class PointsExpired(LedgerEvent):
    """Points lapsed unused.

    Produced by loyalty. Notification may warn the shopper beforehand.
    """

    ce_type = "loyalty.points.expired"
    points_sign = -1


class PointsExpiring(LedgerEvent):
    """Points will expire soon unless the shopper is active (a notice, no balance change).

    Produced by loyalty two weeks before expiry; notification warns the shopper. ``points``
    is 0; ``expiring_points`` says how many and ``expires_at`` when.
    """

    ce_type = "loyalty.points.expiring"

    points: SignedCount = 0
    expiring_points: int = Field(default=0, ge=0, le=INT4_MAX)
    expires_at: UtcDatetime | None = None


class TierChanged(LedgerEvent):
    """A shopper moved to another loyalty tier.

    Produced by loyalty. Customer-profile shows the tier; notification congratulates.
    ``points`` is normally 0.
    """

    ce_type = "loyalty.tier.changed"

    points: SignedCount = 0
    tier: NonEmptyStr | None = None
    previous_tier: NonEmptyStr | None = None


class OfferIssued(LedgerEvent):
    """A shopper received a personal offer (e.g. a voucher for a tier or a birthday).

    Produced by loyalty. Notification delivers it; channels redeem it at checkout.
    ``points`` is normally 0.
    """

    ce_type = "loyalty.offer.issued"

    points: SignedCount = 0
    offer_id: NonEmptyStr | None = None
    description: str | None = None
    expires_at: UtcDatetime | None = None
    # The item offered (often bought with the shopper's purchase, in stock for them), the
    # reward on it (e.g. "10%" or bonus points), and until when it can be used.
    sku: NonEmptyStr | None = None
    reward: str | None = None
    valid_until: UtcDatetime | None = None


# --- notification.dispatched.v1 ----------------------------------------------------------


class SuppressionReason(StrEnum):
    """Why a notification was deliberately not sent."""

    NO_CONSENT = "no_consent"
    QUIET_HOURS = "quiet_hours"
    THROTTLED = "throttled"
    DUPLICATE = "duplicate"
    NO_CONTACT = "no_contact"
    # A cart reminder with nothing left to remind of: every item bought meanwhile, or out
    # of stock (the shopper is offered a back-in-stock alert instead).
    ALREADY_BOUGHT = "already_bought"
    OUT_OF_STOCK = "out_of_stock"


class NotificationEvent(Event):
    """Base of notification outcomes for one shopper."""

    topic = NOTIFICATION_DISPATCHED
    key_field = "customer_id"

    customer_id: NonEmptyStr
    notification_id: NonEmptyStr | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class NotificationSent(NotificationEvent):
    """A message went out to a shopper by e-mail, push or SMS.

    Produced by notification once the provider accepted it. Channels and support can show
    what the shopper was told. Marketing messages that came due together went out as one
    digest: each is told, with the same ``provider_message_id`` and ``digest_id``.
    """

    ce_type = "notification.sent"

    channel: NotificationChannel
    template: NonEmptyStr
    provider_message_id: NonEmptyStr
    # The digest this message went out in: the notification_id of its first message.
    digest_id: NonEmptyStr | None = None


class NotificationFailed(NotificationEvent):
    """A message could not be delivered to the provider.

    Produced by notification after its retries are exhausted. SRE watch the rate. ``error``
    is codes, never a provider's words: ``channel:code`` for each channel tried, joined by
    ``; `` (``push:endpoint_refused; email:timeout``), the codes being ``endpoint_refused``,
    ``endpoint_gone``, ``timeout``, ``unavailable``, ``rejected``, ``invalid_address`` and
    ``not_configured``; or one code for the message itself (``unknown_template``,
    ``template_error``, ``interrupted_twice``, ``no_channel``).
    """

    ce_type = "notification.failed"

    error: NonEmptyStr
    channel: NotificationChannel | None = None
    template: NonEmptyStr | None = None
    attempts: int | None = Field(default=None, ge=1)
    # The digest this message was to go out in (see notification.sent).
    digest_id: NonEmptyStr | None = None


class NotificationSuppressed(NotificationEvent):
    """A message was deliberately not sent (no consent, quiet hours, throttled, ...).

    Produced by notification. Support can explain to a shopper why nothing arrived.
    """

    ce_type = "notification.suppressed"

    reason: SuppressionReason
    channel: NotificationChannel | None = None
    template: NonEmptyStr | None = None


class NotificationDeferred(NotificationEvent):
    """A message was held back until a better time.

    Produced by notification, which decides it again at ``until``. ``reason`` says why:
    ``budget`` (the shopper's contact budget over its rolling window is spent, every channel
    and purpose counted) or ``quiet_hours`` (the shopper's); when both, ``budget``.
    """

    ce_type = "notification.deferred"

    until: UtcDatetime
    channel: NotificationChannel | None = None
    template: NonEmptyStr | None = None
    reason: str | None = None


OUTBOUND_EVENTS: tuple[type[Event], ...] = (
    AvailabilityChanged,
    ReservationConfirmed,
    ReservationRejected,
    ReservationReleased,
    OrderPlaced,
    OrderConfirmed,
    OrderRejected,
    OrderReadyForPickup,
    OrderPickedUp,
    OrderShipped,
    OrderDelivered,
    OrderDelayed,
    OrderCancelled,
    OrderReturnReceived,
    RefundIssued,
    ProfileUpdated,
    ProfilesMerged,
    ProfilesUnmerged,
    ProfileErased,
    CartAbandoned,
    PointsEarned,
    PointsPending,
    PointsAvailable,
    PointsHeld,
    PointsRefused,
    PointsRedeemed,
    PointsReleased,
    PointsReversed,
    PointsExpiring,
    PointsExpired,
    TierChanged,
    OfferIssued,
    NotificationSent,
    NotificationFailed,
    NotificationSuppressed,
    NotificationDeferred,
)
"""Every outbound event type, in CONTRACT.md order."""
