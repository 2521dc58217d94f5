"""Settings of the order service: the platform's plus the order's own (env vars, 12-factor)."""

from __future__ import annotations

from datetime import timedelta

from omni_common.settings import ServiceSettings
from pydantic import Field


class OrderSettings(ServiceSettings):
    """Order-specific knobs; each is also an env var of the same name in upper case."""

    service_name: str = "order"
    # A shopper waits on a checkout's confirmation, but not for a few tens of milliseconds:
    # under load, events gather that long and are handled in lots (consumer_linger_ms).
    consumer_linger_ms: int = Field(default=50, ge=0, le=1000)

    # A pickup not collected within this many days is cancelled and its stock released.
    pickup_collect_days: float = Field(default=7.0, gt=0)
    # When a delivery promise passes with no carrier ETA, the delay notice estimates this
    # many hours after the promise.
    overdue_eta_extension_hours: float = Field(default=24.0, gt=0)
    # An order that got no reservation answer (inventory down, the event lost upstream)
    # within this many seconds is rejected with reason reservation_timeout, instead of
    # staying placed forever; inventory releases any hold that comes later.
    order_reservation_timeout_s: float = Field(default=300.0, gt=0)
    # How often due timers (pickup expiry, delivery promises) are looked for.
    timer_poll_interval_s: float = Field(default=0.5, gt=0)
    # How often the omni_orders_by_status gauge is refreshed from the database.
    status_gauge_interval_s: float = Field(default=15.0, gt=0)
    # Loyalty is a saga participant for checkouts redeeming points: it holds them, and the
    # payment must cover the rest. False: points pay nothing, the payment must cover it all.
    loyalty_in_saga: bool = True
    # The largest page of GET /customers/{id}/orders.
    max_page_size: int = Field(default=100, ge=1)

    @property
    def pickup_window(self) -> timedelta:
        """How long a packed pickup order waits for its shopper."""
        return timedelta(days=self.pickup_collect_days)

    @property
    def reservation_timeout(self) -> timedelta:
        """How long a placed order waits for its participants' answers."""
        return timedelta(seconds=self.order_reservation_timeout_s)

    @property
    def overdue_eta_extension(self) -> timedelta:
        """The estimated lateness announced when a promise passes without a carrier ETA."""
        return timedelta(hours=self.overdue_eta_extension_hours)
