"""Kafka and timer entry points: each event handled in its own transaction with the inbox.

Handlers have the platform's signature ``async def handle(event, envelope)`` once their
dependencies are bound. Domain refusals (:class:`~customer_profile_service.domain.ProfileError`)
become :class:`~omni_common.kafka.RejectedEvent` (dead-lettered with their reason:
``unknown_customer``, ``erased_customer``, ``invalid_contact``, ``blocked_identifier``,
``invalid_preferences``, ``cart_too_large``); anything else is retried, then dead-lettered.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from omni_common.kafka import EventHandler, RejectedEvent, Subscription, only_when
from omni_common.service import ServiceRuntime, Tx
from omni_contracts import (
    CART_EVENTS,
    CHECKOUT_SUBMITTED,
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
    RefundIssued,
    SaleRecorded,
)
from omni_contracts.envelope import Envelope

from customer_profile_service.adapters.metrics import ProfileMetrics
from customer_profile_service.domain import ProfileError
from customer_profile_service.service import carts, profiles
from customer_profile_service.service.context import Outcome, Profiles

UseCase = Callable[[Profiles, Tx, Any, Envelope | None], Awaitable[Outcome]]


@dataclass(frozen=True)
class Deps:
    """What the entry points need: the runtime, the policy and the metrics."""

    runtime: ServiceRuntime
    profiles: Profiles
    metrics: ProfileMetrics

    def consumer(self, topic: str) -> str:
        """The inbox consumer name for events of ``topic``."""
        return f"{self.runtime.settings.service_name}:{topic}"

    def observe(self, out: Outcome) -> None:
        """Count what a committed use case did."""
        m, s = self.metrics, self.metrics.service
        m.merges.labels(s).inc(out.merges)
        m.snapshots.labels(s).inc(out.snapshots)
        m.erasures.labels(s).inc(out.erased)
        for kind, reason in out.skipped_identifiers:
            m.identifiers_skipped.labels(s, kind, reason).inc()
        for reason in out.cart_skips:
            m.abandonments_skipped.labels(s, reason).inc()


@contextlib.asynccontextmanager
async def _refusals() -> AsyncIterator[None]:
    """Turn the domain's refusals into dead-lettered rejections with a clear reason."""
    try:
        yield
    except ProfileError as exc:
        raise RejectedEvent(exc.reason, exc.detail) from exc


def _bound(deps: Deps, use_case: UseCase) -> EventHandler:
    async def handle(event: Any, envelope: Envelope) -> None:
        async with _refusals(), deps.runtime.handling(deps.consumer(event.topic), envelope) as tx:
            if tx is None:
                return  # handled before: no second effect
            outcome = await use_case(deps.profiles, tx, event, envelope)
            tx.after_commit(lambda: deps.observe(outcome))  # committed: now it is true

    handle.__name__ = use_case.__name__
    handle.__doc__ = use_case.__doc__
    return handle


def subscriptions(deps: Deps) -> list[Subscription]:
    """Every topic customer-profile consumes, with its handlers."""

    def h(use_case: UseCase) -> EventHandler:
        return _bound(deps, use_case)

    order_moved = h(profiles.order_moved)
    return [
        Subscription(
            CUSTOMER_SIGNALS,
            {
                CustomerIdentified: h(profiles.identified),
                ContactDetailsUpdated: h(profiles.contact_updated),
                PreferencesUpdated: h(profiles.preferences_updated),
                ErasureRequested: h(profiles.erasure_requested),
            },
        ),
        Subscription(
            STORE_SALES,
            {SaleRecorded: only_when(profiles.names_a_shopper, h(profiles.sale_recorded))},
        ),
        Subscription(CHECKOUT_SUBMITTED, {CheckoutSubmitted: h(profiles.checkout_submitted)}),
        Subscription(
            ORDER_LIFECYCLE,
            {
                OrderPlaced: h(profiles.order_placed),
                **{
                    model: order_moved
                    for model in (
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
                    )
                },
            },
        ),
        Subscription(
            CART_EVENTS,
            {
                model: h(carts.cart_changed)
                for model in (CartItemAdded, CartItemRemoved, CartViewed, CartCheckedOut)
            },
        ),
    ]


async def abandonments_due(deps: Deps, tx: Tx, due: list[tuple[str, dict[str, Any]]]) -> None:
    """Timer: carts' abandonment deadlines passed (runs in the timers' transaction)."""
    verdicts = await carts.abandonments_due(deps.profiles, tx, [key for key, _ in due])
    m, s = deps.metrics, deps.metrics.service
    now = datetime.now(UTC)
    # Counted inside the wheel's transaction: it commits right after this returns.
    for (_, payload), (verdict, channel) in zip(due, verdicts, strict=True):
        if verdict.announce:
            m.carts_abandoned.labels(s, channel).inc()
            if (deadline := carts.due_at(payload)) is not None:
                m.abandonment_lag.labels(s).observe(max((now - deadline).total_seconds(), 0.0))
        elif verdict.skip is not None:
            m.abandonments_skipped.labels(s, verdict.skip.value).inc()


def timer_handler(
    deps: Deps,
) -> Callable[[Tx, list[tuple[str, dict[str, Any]]]], Awaitable[None]]:
    """The abandonment timers' batch handler with its dependencies bound."""
    return functools.partial(abandonments_due, deps)
