"""What customer-profile consumes and which timers it keeps: one handler per kind of event.

Each handler has the runtime's shape (see ``omni_common.handlers``) and applies a use case
of :mod:`~customer_profile_service.service.profiles` or ``carts`` in the transaction it is
given. Domain refusals (:class:`~customer_profile_service.domain.ProfileError`:
``unknown_customer``, ``erased_customer``, ``invalid_contact``, ``blocked_identifier``,
``invalid_preferences``, ``cart_too_large``) are dead-lettered with their reason by the
runtime; anything else is retried, then dead-lettered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from omni_common.handlers import Due, Lot, Subscription, only_when
from omni_common.service import Tx
from omni_contracts import (
    CART_EVENTS,
    CHECKOUT_SUBMITTED,
    CUSTOMER_IDENTITY_REQUESTS,
    CUSTOMER_SIGNALS,
    ORDER_LIFECYCLE,
    STORE_SALES,
    CartCheckedOut,
    CartItemAdded,
    CartItemRemoved,
    CartViewed,
    CheckoutSubmitted,
    ContactDetailsUpdated,
    CustomerIdentified,
    ErasureRequested,
    OrderCancelled,
    OrderConfirmed,
    OrderDelayed,
    OrderDelivered,
    OrderPickedUp,
    OrderPlaced,
    OrderReadyForPickup,
    OrderRejected,
    OrderReturnReceived,
    OrderShipped,
    PreferencesUpdated,
    PushAddressesGone,
    RefundIssued,
    SaleRecorded,
    UnmergeRequested,
)
from omni_contracts.envelope import Envelope

from customer_profile_service.adapters.metrics import ProfileMetrics
from customer_profile_service.service import carts, profiles, purchases
from customer_profile_service.service.context import CART_ABANDONMENT, Outcome, Profiles

UseCase = Callable[[Profiles, Tx, Any, Envelope | None], Awaitable[Outcome]]


async def _each(
    lot: Lot[Any], tx: Tx, policy: Profiles, metrics: ProfileMetrics, use_case: UseCase
) -> None:
    for event, envelope in lot:
        outcome = await use_case(policy, tx, event, envelope)
        _observe(tx, metrics, outcome)


def _observe(tx: Tx, metrics: ProfileMetrics, outcome: Outcome) -> None:
    tx.after_commit(lambda: metrics.observe(outcome))  # committed: now it is true


async def customers_identified(
    signals: Lot[CustomerIdentified], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """A login or sign-up joins a device (and cart) to a customer."""
    await _each(signals, tx, policy, metrics, profiles.identified)


async def contacts_updated(
    signals: Lot[ContactDetailsUpdated], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """A shopper's e-mail, phone or push subscription changed."""
    await _each(signals, tx, policy, metrics, profiles.contact_updated)


async def preferences_updated(
    signals: Lot[PreferencesUpdated], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """A shopper's consent, channel, language or quiet hours changed."""
    await _each(signals, tx, policy, metrics, profiles.preferences_updated)


async def push_addresses_gone(
    signals: Lot[PushAddressesGone], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """A push service said devices are gone: the profile forgets them."""
    await _each(signals, tx, policy, metrics, profiles.push_addresses_gone)


async def unmerges_requested(
    requests: Lot[UnmergeRequested], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """Ops or the call centre undo a wrong merge."""
    await _each(requests, tx, policy, metrics, profiles.unmerge_requested)


async def erasures_requested(
    signals: Lot[ErasureRequested], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """A shopper asked to be forgotten."""
    await _each(signals, tx, policy, metrics, profiles.erasure_requested)


async def sales_recorded(
    sales: Lot[SaleRecorded], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """A till sale to a known shopper (customer or loyalty card) joins their history."""
    await _each(sales, tx, policy, metrics, profiles.sale_recorded)


async def checkouts_submitted(
    checkouts: Lot[CheckoutSubmitted], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """Checkouts: their shoppers are known, and their carts are bought."""
    _observe(tx, metrics, await purchases.checkouts_submitted(policy, tx, checkouts))


async def orders_placed(
    orders: Lot[OrderPlaced], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """Placed orders join their shoppers' purchase histories."""
    _observe(tx, metrics, await purchases.orders_placed(policy, tx, orders))


async def orders_moved(orders: Lot[Any], tx: Tx, policy: Profiles) -> None:
    """Orders' later statuses are kept in their shoppers' histories."""
    await purchases.orders_moved(policy, tx, orders)


async def carts_changed(
    carts_: Lot[Any], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """A cart's items, view or checkout: kept, and its abandonment timer moved."""
    await _each(carts_, tx, policy, metrics, carts.cart_changed)


async def abandonments_due(
    due: list[Due], tx: Tx, policy: Profiles, metrics: ProfileMetrics
) -> None:
    """Timer: carts' abandonment deadlines passed; each is announced or said why not."""
    verdicts = await carts.abandonments_due(policy, tx, [timer.key for timer in due])
    now = policy.clock()

    def count() -> None:  # committed: now it is true
        m, s = metrics, metrics.service
        for timer, (verdict, channel) in zip(due, verdicts, strict=True):
            if verdict.announce:
                m.carts_abandoned.labels(s, channel).inc()
                if (deadline := carts.due_at(timer.payload)) is not None:
                    m.abandonment_lag.labels(s).observe(max((now - deadline).total_seconds(), 0))
            elif verdict.skip is not None:
                m.abandonments_skipped.labels(s, verdict.skip.value).inc()

    tx.after_commit(count)


def subscriptions() -> list[Subscription]:
    """Every topic customer-profile consumes, with its handlers."""
    return [
        Subscription(
            CUSTOMER_SIGNALS,
            {
                CustomerIdentified: customers_identified,
                ContactDetailsUpdated: contacts_updated,
                PreferencesUpdated: preferences_updated,
                ErasureRequested: erasures_requested,
                PushAddressesGone: push_addresses_gone,
            },
        ),
        Subscription(CUSTOMER_IDENTITY_REQUESTS, {UnmergeRequested: unmerges_requested}),
        Subscription(
            STORE_SALES, {SaleRecorded: only_when(profiles.names_a_shopper, sales_recorded)}
        ),
        Subscription(CHECKOUT_SUBMITTED, {CheckoutSubmitted: checkouts_submitted}),
        Subscription(
            ORDER_LIFECYCLE,
            {
                OrderPlaced: orders_placed,
                OrderConfirmed: orders_moved,
                OrderRejected: orders_moved,
                OrderReadyForPickup: orders_moved,
                OrderPickedUp: orders_moved,
                OrderShipped: orders_moved,
                OrderDelivered: orders_moved,
                OrderDelayed: orders_moved,
                OrderCancelled: orders_moved,
                OrderReturnReceived: orders_moved,
                RefundIssued: orders_moved,
            },
        ),
        Subscription(
            CART_EVENTS,
            {
                CartItemAdded: carts_changed,
                CartItemRemoved: carts_changed,
                CartViewed: carts_changed,
                CartCheckedOut: carts_changed,
            },
        ),
    ]


TIMERS = {CART_ABANDONMENT: abandonments_due}
"""customer-profile's durable timers, by kind."""
