"""Topic names, closed vocabularies and sub-models shared by inbound and outbound events.

Topic names live here (not in ``catalogue``) so that the event modules can name their topic
without importing the catalogue, which imports them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import time
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from omni_contracts.base import (
    INT4_MAX,
    ContractModel,
    Money,
    NonEmptyStr,
    PositiveQuantity,
    Quantity,
)

# --- topic names -------------------------------------------------------------------------
# Inbound: channels produce, the platform consumes.
STORE_SALES = "store.sales.v1"
INVENTORY_ADJUSTMENTS = "inventory.adjustments.v1"
CART_EVENTS = "cart.events.v1"
CHECKOUT_SUBMITTED = "checkout.submitted.v1"
CUSTOMER_SIGNALS = "customer.signals.v1"
CUSTOMER_IDENTITY_REQUESTS = "customer.identity.requests.v1"
ORDER_REQUESTS = "order.requests.v1"
FULFILLMENT_EVENTS = "fulfillment.events.v1"
RETURNS_RECEIVED = "returns.received.v1"
# Outbound: the platform produces, channels consume.
INVENTORY_AVAILABILITY = "inventory.availability.v1"
INVENTORY_RESERVATIONS = "inventory.reservations.v1"
ORDER_LIFECYCLE = "order.lifecycle.v1"
CUSTOMER_PROFILE = "customer.profile.v1"
CART_ABANDONED = "cart.abandoned.v1"
LOYALTY_LEDGER = "loyalty.ledger.v1"
NOTIFICATION_DISPATCHED = "notification.dispatched.v1"


# --- scalar helpers ----------------------------------------------------------------------
def _non_zero(value: int) -> int:
    # A zero delta is a no-op at best and a producer bug at worst: reject it at the border.
    if value == 0:
        raise ValueError("a delta must not be zero")
    return value


NonZeroDelta = Annotated[int, Field(ge=-INT4_MAX, le=INT4_MAX), AfterValidator(_non_zero)]
"""A signed change in a number of units, never zero."""

CountryCode = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
"""An ISO 3166-1 alpha-2 country code."""


def single_currency(amounts: Iterable[Money | None]) -> str | None:
    """The one currency of ``amounts`` (None if empty); raise if they mix currencies.

    ``None`` entries (absent optional amounts) are skipped.
    """
    currencies = {money.currency for money in amounts if money is not None}
    if len(currencies) > 1:
        raise ValueError(f"amounts mix currencies: {sorted(currencies)}")
    return next(iter(currencies), None)


# --- closed vocabularies -----------------------------------------------------------------
class FulfillmentType(StrEnum):
    """How the goods reach the shopper."""

    DELIVERY = "delivery"
    PICKUP = "pickup"


class NotificationChannel(StrEnum):
    """A way of reaching a shopper outside a shop (not to be confused with ``Channel``)."""

    EMAIL = "email"
    PUSH = "push"
    SMS = "sms"


# --- sub-models --------------------------------------------------------------------------
class Line(ContractModel):
    """One line of a sale, cart, checkout or order: a SKU, how many, at what unit price."""

    sku: NonEmptyStr
    qty: PositiveQuantity
    unit_price: Money

    def total(self) -> Money:
        """The line's value: ``qty`` times ``unit_price``."""
        return Money(amount=self.unit_price.amount * self.qty, currency=self.unit_price.currency)


class Address(ContractModel):
    """A postal address for delivery."""

    line1: NonEmptyStr
    line2: str | None = None
    city: NonEmptyStr
    postal_code: NonEmptyStr
    country: CountryCode
    region: str | None = None
    recipient: str | None = None
    phone: str | None = None


class Fulfillment(ContractModel):
    """How an order is fulfilled: delivered to an address or picked up at a location."""

    type: FulfillmentType
    location_id: NonEmptyStr | None = None
    address: Address | None = None

    @model_validator(mode="after")
    def _pickup_needs_a_location(self) -> Fulfillment:
        # Without a location inventory cannot reserve and the store cannot prepare the order.
        if self.type is FulfillmentType.PICKUP and self.location_id is None:
            raise ValueError("pickup fulfillment requires location_id")
        return self


class Payment(ContractModel):
    """The payment authorised at checkout (captured by the payment provider later)."""

    reference: NonEmptyStr
    authorized: Money
    method: str | None = None


class Allocation(ContractModel):
    """Units of one SKU reserved at one location for an order."""

    sku: NonEmptyStr
    location_id: NonEmptyStr
    qty: PositiveQuantity


class Shortage(ContractModel):
    """A SKU an order asked for more of than was available."""

    sku: NonEmptyStr
    requested: PositiveQuantity
    available: Quantity

    @model_validator(mode="after")
    def _is_short(self) -> Shortage:
        if self.available >= self.requested:
            raise ValueError("a shortage needs available < requested")
        return self


class ReturnLine(ContractModel):
    """Units of one SKU handed back, and whether they can be sold again."""

    sku: NonEmptyStr
    qty: PositiveQuantity
    resellable: bool
    reason: str | None = None


class Consents(ContractModel):
    """Consent per notification channel for one purpose; None means the shopper was never
    asked. For marketing only an explicit yes counts (:meth:`allows`); for transactional
    messages (order updates) only an explicit no blocks (:meth:`refuses`)."""

    email: bool | None = None
    push: bool | None = None
    sms: bool | None = None

    def allows(self, channel: NotificationChannel) -> bool:
        """Whether marketing may be sent on ``channel`` (only an explicit yes counts)."""
        return getattr(self, channel.value) is True

    def refuses(self, channel: NotificationChannel) -> bool:
        """Whether the shopper said no on ``channel`` (what blocks transactional messages)."""
        return getattr(self, channel.value) is False


class PushSubscriptionKeys(ContractModel):
    """The browser's keys for encrypting Web Push payloads (RFC 8291), base64url."""

    p256dh: Annotated[str, Field(min_length=1, max_length=200)]
    auth: Annotated[str, Field(min_length=1, max_length=100)]


class PushSubscription(ContractModel):
    """A browser's Web Push subscription: the W3C ``PushSubscription.toJSON()`` shape.

    ``endpoint`` is the push service URL the browser was given; notification sends the
    encrypted message there, signed with the platform's VAPID key (RFC 8292).
    """

    endpoint: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^https?://")]
    keys: PushSubscriptionKeys
    expirationTime: int | None = None


class Preferences(ContractModel):
    """How and when a shopper likes to be contacted."""

    preferred_channel: NotificationChannel | None = None
    # Marketing (reminders, offers, alerts): sent only where the shopper said yes.
    consents: Consents = Field(default_factory=Consents)
    # Transactional (order updates): sent unless the shopper said no on that channel.
    transactional_consents: Consents = Field(default_factory=Consents)
    language: str | None = None
    # An IANA zone name; notification needs it to send "at a decent hour".
    time_zone: str | None = None
    quiet_hours_start: time | None = None
    quiet_hours_end: time | None = None
