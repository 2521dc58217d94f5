"""Events that channels (web, app, store POS, warehouse, carriers) produce for the platform.

Required fields are exactly those CONTRACT.md names; everything else is optional so that a
channel team following the contract is never rejected. Where the contract names no time field
``occurred_at`` defaults to the moment of parsing; producers should send it anyway.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, model_validator

from omni_contracts.base import (
    MAX_IDENTIFIER,
    MAX_LINES,
    Channel,
    Event,
    Money,
    NonEmptyStr,
    Quantity,
    UtcDatetime,
    utcnow,
)
from omni_contracts.common import (
    CART_EVENTS,
    CHECKOUT_SUBMITTED,
    CUSTOMER_IDENTITY_REQUESTS,
    CUSTOMER_SIGNALS,
    FULFILLMENT_EVENTS,
    INVENTORY_ADJUSTMENTS,
    ORDER_REQUESTS,
    RETURNS_RECEIVED,
    STORE_SALES,
    Fulfillment,
    Line,
    NonZeroDelta,
    Payment,
    Preferences,
    PushSubscription,
    ReturnLine,
    single_currency,
)

# --- store.sales.v1 ----------------------------------------------------------------------


class SaleRecorded(Event):
    """A till in a store recorded a sale.

    Produced by the store POS when a sale completes. Inventory takes the units off the shelf,
    order records it as an order born completed (channel ``store``), customer-profile adds it to
    the purchase history and loyalty awards points when a customer or loyalty card is known.
    """

    topic = STORE_SALES
    ce_type = "store.sale.recorded"
    key_field = "location_id"

    sale_id: NonEmptyStr
    location_id: NonEmptyStr
    lines: list[Line] = Field(min_length=1, max_length=MAX_LINES)
    occurred_at: UtcDatetime
    customer_id: NonEmptyStr | None = None
    loyalty_card: NonEmptyStr | None = None
    terminal_id: NonEmptyStr | None = None
    total: Money | None = None

    @model_validator(mode="after")
    def _one_currency(self) -> SaleRecorded:
        single_currency([*(line.unit_price for line in self.lines), self.total])
        return self

    def subject(self) -> str | None:
        # The key groups a store's sales; the entity the event is about is the sale.
        return self.sale_id


# --- inventory.adjustments.v1 ------------------------------------------------------------


class AdjustmentKind(StrEnum):
    """Why stock at a location changed outside a sale, a reservation or a return."""

    RECEIPT = "receipt"
    COUNT = "count"
    DAMAGE = "damage"
    TRANSFER_IN = "transfer_in"
    TRANSFER_OUT = "transfer_out"


# The direction each delta kind must move stock: a damage sent as +5 would otherwise add stock.
_DELTA_SIGN: dict[AdjustmentKind, int] = {
    AdjustmentKind.RECEIPT: +1,
    AdjustmentKind.TRANSFER_IN: +1,
    AdjustmentKind.DAMAGE: -1,
    AdjustmentKind.TRANSFER_OUT: -1,
}


class StockAdjusted(Event):
    """Stock of one SKU at one location was received, counted, damaged or transferred.

    Produced by stores and warehouses. ``delta`` is the signed change in units on hand
    (positive for ``receipt`` and ``transfer_in``, negative for ``damage`` and
    ``transfer_out``); a ``count`` instead gives the absolute ``counted`` units. Consumed by
    inventory, which publishes the resulting availability.
    """

    topic = INVENTORY_ADJUSTMENTS
    ce_type = "inventory.stock.adjusted"
    key_field = "sku"

    adjustment_id: NonEmptyStr
    location_id: NonEmptyStr
    sku: NonEmptyStr
    kind: AdjustmentKind
    delta: NonZeroDelta | None = None
    counted: Quantity | None = None
    occurred_at: UtcDatetime
    reason: str | None = None
    # e.g. a purchase order or transfer number, to tie both legs of a transfer together
    reference: str | None = None

    @model_validator(mode="after")
    def _delta_or_count(self) -> StockAdjusted:
        if self.kind is AdjustmentKind.COUNT:
            if self.counted is None:
                raise ValueError("a count adjustment requires counted")
            if self.delta is not None:
                raise ValueError("a count adjustment gives counted, not delta")
            return self
        if self.delta is None:
            raise ValueError(f"a {self.kind} adjustment requires delta")
        if self.counted is not None:
            raise ValueError(f"a {self.kind} adjustment gives delta, not counted")
        if self.delta * _DELTA_SIGN[self.kind] < 0:
            sign = "positive" if _DELTA_SIGN[self.kind] > 0 else "negative"
            raise ValueError(f"a {self.kind} adjustment needs a {sign} delta")
        return self


# --- cart.events.v1 ----------------------------------------------------------------------


class CartEvent(Event):
    """Base of cart events: the whole cart after the change."""

    topic = CART_EVENTS
    key_field = "cart_id"

    cart_id: NonEmptyStr
    channel: Channel
    customer_id: NonEmptyStr | None = None
    anonymous_id: NonEmptyStr | None = None
    # The whole cart after the change (empty once the last item is removed).
    items: list[Line] = Field(max_length=MAX_LINES)
    occurred_at: UtcDatetime

    @model_validator(mode="after")
    def _someone_owns_the_cart(self) -> CartEvent:
        if self.customer_id is None and self.anonymous_id is None:
            raise ValueError("a cart event requires customer_id or anonymous_id")
        single_currency(item.unit_price for item in self.items)
        return self


class CartItemAdded(CartEvent):
    """A shopper put an item in a cart (or raised its quantity).

    Produced by web and app. Customer-profile keeps the cart and (re)starts its abandonment
    timer.
    """

    ce_type = "cart.item.added"

    # Which item changed; ``items`` stays the source of truth for the cart's content.
    sku: NonEmptyStr | None = None


class CartItemRemoved(CartEvent):
    """A shopper took an item out of a cart (or lowered its quantity).

    Produced by web and app. Customer-profile keeps the cart and (re)starts its abandonment
    timer.
    """

    ce_type = "cart.item.removed"

    sku: NonEmptyStr | None = None


class CartViewed(CartEvent):
    """A shopper looked at a cart without changing it.

    Produced by web and app. Customer-profile counts it as activity on the cart.
    """

    ce_type = "cart.viewed"


class CartCheckedOut(CartEvent):
    """A shopper went through checkout with a cart.

    Produced by web and app. Customer-profile stops the cart's abandonment timer.
    """

    ce_type = "cart.checked_out"

    checkout_id: NonEmptyStr | None = None


# --- checkout.submitted.v1 ---------------------------------------------------------------


class CheckoutSubmitted(Event):
    """A shopper submitted a checkout with an authorised payment.

    Produced by web, app and call centre. Order turns it into an order (``checkout_id`` is the
    idempotency key) and asks inventory to reserve the lines; loyalty holds
    ``points_to_redeem``.
    """

    topic = CHECKOUT_SUBMITTED
    ce_type = "checkout.submitted"
    key_field = "customer_id"

    checkout_id: NonEmptyStr
    customer_id: NonEmptyStr
    channel: Channel
    lines: list[Line] = Field(min_length=1, max_length=MAX_LINES)
    fulfillment: Fulfillment
    payment: Payment
    cart_id: NonEmptyStr | None = None
    points_to_redeem: Quantity | None = None
    total: Money | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _one_currency(self) -> CheckoutSubmitted:
        prices = (line.unit_price for line in self.lines)
        single_currency([*prices, self.payment.authorized, self.total])
        return self

    def subject(self) -> str | None:
        return self.checkout_id


# --- customer.signals.v1 -----------------------------------------------------------------


class IdentificationMethod(StrEnum):
    """How a shopper made themselves known."""

    LOGIN = "login"
    SIGN_UP = "sign_up"


class CustomerIdentified(Event):
    """A shopper logged in or signed up, joining a device's ``anonymous_id`` to a customer.

    Produced by web, app and store (e.g. a loyalty card scanned at the till). Customer-profile
    links the identities and merges the anonymous activity (carts) into the profile. A login
    is proof of who the shopper is: with a loyalty card scanned at a till and a verified
    e-mail or phone (see ``customer.contact.updated``), it is what may merge two profiles.
    """

    topic = CUSTOMER_SIGNALS
    ce_type = "customer.identified"
    key_field = "customer_id"

    customer_id: NonEmptyStr
    anonymous_id: NonEmptyStr
    channel: Channel | None = None
    method: IdentificationMethod | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class ContactField(StrEnum):
    """A contact detail a shopper can remove."""

    EMAIL = "email"
    PHONE = "phone"
    PUSH_TOKEN = "push_token"
    PUSH_SUBSCRIPTION = "push_subscription"


class ContactDetailsUpdated(Event):
    """A shopper changed or removed an e-mail address, phone number or push registration.

    Produced by web, app, store and call centre. A field that is absent or null is unchanged;
    ``cleared`` names the details removed. ``push_token`` is a native app's FCM token;
    ``push_subscription`` a browser's Web Push subscription (``PushSubscription.toJSON()``);
    a shopper may register several devices, one update each (customer-profile keeps the
    newest few, and only the subscription's W3C keys). Customer-profile updates the profile;
    notification its contact list. Any update naming a new ``customer_id`` starts its
    profile: sign-ups need no login first.

    **Merges need proof.** ``email_verified`` / ``phone_verified`` say the channel proved the
    shopper controls the address (a link clicked, a code typed); absent means not verified.
    An unverified address is kept as the shopper's contact (messages go to it) but never
    merges two profiles and never finds a profile in ``GET /customers/lookup``: anyone can
    type someone else's address into their own account, and a merge on it would hand that
    someone's profile, orders and points over. Profiles merge only on a login
    (``customer.identified``), a loyalty card scanned at a till, or a verified e-mail or phone.
    """

    topic = CUSTOMER_SIGNALS
    ce_type = "customer.contact.updated"
    key_field = "customer_id"

    customer_id: NonEmptyStr
    email: NonEmptyStr | None = None
    phone: NonEmptyStr | None = None
    push_token: NonEmptyStr | None = None
    push_subscription: PushSubscription | None = None
    # The channel proved the shopper controls the address (absent or null: not verified).
    email_verified: bool | None = None
    phone_verified: bool | None = None
    # Removals are explicit: null cannot mean "remove", since serialisers write unset fields
    # as null and a re-published partial update would then wipe the other details.
    cleared: list[ContactField] = Field(default_factory=list)
    channel: Channel | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _changes_something(self) -> ContactDetailsUpdated:
        changed = {f for f in ContactField if getattr(self, f.value) is not None}
        if not changed and not self.cleared:
            raise ValueError(
                "a contact update needs email, phone, push_token, push_subscription or cleared"
            )
        if changed & set(self.cleared):
            raise ValueError("a contact detail cannot be both set and cleared")
        return self


class PreferencesUpdated(Event):
    """A shopper changed consent, preferred channel, language or quiet hours.

    Produced by web, app, store and call centre. Customer-profile stores them; notification
    honours them for every message after this one.
    """

    topic = CUSTOMER_SIGNALS
    ce_type = "customer.preferences.updated"
    key_field = "customer_id"

    customer_id: NonEmptyStr
    preferences: Preferences = Field(default_factory=Preferences)
    channel: Channel | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class ErasureRequested(Event):
    """A shopper asked to be forgotten (GDPR right to erasure).

    Produced by web, app and call centre. Customer-profile erases the profile and publishes
    ``customer.profile.erased`` so every service drops its personal data.
    """

    topic = CUSTOMER_SIGNALS
    ce_type = "customer.erasure.requested"
    key_field = "customer_id"

    customer_id: NonEmptyStr
    request_id: NonEmptyStr | None = None
    channel: Channel | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class StockAlertRequested(Event):
    """A shopper asked to be told when an out-of-stock SKU is back (back-in-stock alert).

    Produced by web and app. With ``location_id`` the alert is for that store; without it,
    for online availability. Notification sends one message when the SKU is available
    again, then the alert is done.
    """

    topic = CUSTOMER_SIGNALS
    ce_type = "customer.stock_alert.requested"
    key_field = "customer_id"

    customer_id: NonEmptyStr
    sku: NonEmptyStr
    location_id: NonEmptyStr | None = None
    channel: Channel | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class PushAddressesGone(Event):
    """A push service said some of a shopper's devices are gone (HTTP 404 or 410).

    Produced by notification when a Web Push endpoint or an app's FCM token is found gone;
    customer-profile removes them from the profile, so the next snapshot does not bring them
    back. Gone is for good, whatever the clocks say: a push service never hands a gone
    endpoint or token out again, so a registration of one (a channel re-sending what it
    stored) is ignored; a new subscription has a new endpoint.
    """

    topic = CUSTOMER_SIGNALS
    ce_type = "customer.push_addresses.gone"
    key_field = "customer_id"

    customer_id: NonEmptyStr
    endpoints: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(
        default_factory=list, max_length=100
    )
    push_tokens: list[NonEmptyStr] = Field(default_factory=list, max_length=100)
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


# --- customer.identity.requests.v1 -------------------------------------------------------


class UnmergeRequested(Event):
    """Ops or the call centre found two merged profiles to be two shoppers: undo the merge.

    Produced by ops and call-centre tools (the topic is theirs alone), or through
    ``POST /customers/{surviving_id}/unmerge``. Customer-profile restores ``merged_id`` with
    the identifiers, contact, consents, carts and history that were its own, publishes
    ``customer.profiles.unmerged`` and a fresh snapshot of both; loyalty and notification
    move back what belongs to the restored id. ``customer_id`` equals ``surviving_id``.
    """

    topic = CUSTOMER_IDENTITY_REQUESTS
    ce_type = "customer.profiles.unmerge.requested"
    key_field = "customer_id"

    customer_id: NonEmptyStr
    surviving_id: NonEmptyStr
    merged_id: NonEmptyStr
    reason: Annotated[str, Field(min_length=1, max_length=MAX_IDENTIFIER)]
    channel: Channel | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)

    @model_validator(mode="before")
    @classmethod
    def _key_is_survivor(cls, data: Any) -> Any:
        # The request names surviving_id; the topic's key is customer_id: keep both, equal.
        if isinstance(data, dict) and data.get("customer_id") is None:
            return {**data, "customer_id": data.get("surviving_id")}
        return data

    @model_validator(mode="after")
    def _two_profiles(self) -> UnmergeRequested:
        if self.customer_id != self.surviving_id:
            raise ValueError("customer_id must equal surviving_id")
        if self.surviving_id == self.merged_id:
            raise ValueError("merged_id must differ from surviving_id")
        return self


# --- order.requests.v1 -------------------------------------------------------------------


class OrderCancellationRequested(Event):
    """A shopper or a store asked to cancel an order before it is fulfilled.

    Produced by web, app, store and call centre. Order cancels it if it is not yet shipped or
    picked up and publishes ``order.cancelled``; otherwise the request is ignored.
    """

    topic = ORDER_REQUESTS
    ce_type = "order.cancellation.requested"
    key_field = "order_id"

    order_id: NonEmptyStr
    channel: Channel
    reason: NonEmptyStr
    customer_id: NonEmptyStr | None = None
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


# --- fulfillment.events.v1 ---------------------------------------------------------------


class FulfillmentEvent(Event):
    """Base of fulfilment events: progress of one order reported by a store, warehouse or
    carrier."""

    topic = FULFILLMENT_EVENTS
    key_field = "order_id"

    order_id: NonEmptyStr
    occurred_at: UtcDatetime = Field(default_factory=utcnow)


class ReadyForPickup(FulfillmentEvent):
    """An order is packed and waiting for the shopper at a store.

    Produced by the store. Order publishes ``order.ready_for_pickup`` and starts the
    not-collected timer; notification tells the shopper.
    """

    ce_type = "fulfillment.ready_for_pickup"

    location_id: NonEmptyStr | None = None
    collect_by: UtcDatetime | None = None


class PickedUp(FulfillmentEvent):
    """The shopper collected an order at a store.

    Produced by the store. Order completes the order; inventory takes the reserved units off
    hand.
    """

    ce_type = "fulfillment.picked_up"

    location_id: NonEmptyStr | None = None


class Shipped(FulfillmentEvent):
    """An order left a warehouse or store with a carrier.

    Produced by the warehouse or store. Order publishes ``order.shipped`` and watches
    ``promised_by``; inventory takes the reserved units off hand.
    """

    ce_type = "fulfillment.shipped"

    carrier: NonEmptyStr
    tracking_id: NonEmptyStr
    promised_by: UtcDatetime
    location_id: NonEmptyStr | None = None
    tracking_url: str | None = None


class EtaChanged(FulfillmentEvent):
    """A carrier now expects to deliver an order at a different time.

    Produced by carrier adapters. Order publishes ``order.delayed`` when the new ``eta`` is
    later than the promise.
    """

    ce_type = "fulfillment.eta_changed"

    eta: UtcDatetime
    carrier: NonEmptyStr | None = None
    tracking_id: NonEmptyStr | None = None
    reason: str | None = None


class Delivered(FulfillmentEvent):
    """A carrier delivered an order.

    Produced by carrier adapters. Order publishes ``order.delivered``.
    """

    ce_type = "fulfillment.delivered"

    carrier: NonEmptyStr | None = None
    tracking_id: NonEmptyStr | None = None


# --- returns.received.v1 -----------------------------------------------------------------


class ReturnReceived(Event):
    """A shopper handed back items of an order at a store or sent them to a warehouse.

    Produced by stores and warehouses. Order records the return and refunds it; inventory puts
    resellable units back on hand at ``location_id``; loyalty reverses the points earned.
    """

    topic = RETURNS_RECEIVED
    ce_type = "return.received"
    key_field = "order_id"

    return_id: NonEmptyStr
    order_id: NonEmptyStr
    location_id: NonEmptyStr
    channel: Channel
    lines: list[ReturnLine] = Field(min_length=1, max_length=MAX_LINES)
    occurred_at: UtcDatetime
    customer_id: NonEmptyStr | None = None


INBOUND_EVENTS: tuple[type[Event], ...] = (
    SaleRecorded,
    StockAdjusted,
    CartItemAdded,
    CartItemRemoved,
    CartViewed,
    CartCheckedOut,
    CheckoutSubmitted,
    CustomerIdentified,
    ContactDetailsUpdated,
    PreferencesUpdated,
    ErasureRequested,
    StockAlertRequested,
    PushAddressesGone,
    UnmergeRequested,
    OrderCancellationRequested,
    ReadyForPickup,
    PickedUp,
    Shipped,
    EtaChanged,
    Delivered,
    ReturnReceived,
)
"""Every inbound event type, in CONTRACT.md order."""
