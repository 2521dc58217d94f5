"""Customer-profile settings: the platform's settings plus what only this service needs."""

from __future__ import annotations

from datetime import timedelta

from omni_common.settings import Duration, ServiceSettings
from pydantic import Field


class ProfileSettings(ServiceSettings):
    """Settings of the customer-profile service (environment variables in upper case).

    - ``CART_ABANDONMENT_DELAY``: how long a cart with items sits untouched before it counts
      as abandoned (seconds or ISO 8601; default one hour);
    - ``CART_TIMER_POLL_S``: how often due abandonment timers are looked for;
    - ``CART_TIMER_PER_TRANSACTION``: abandonments decided per transaction (one commit for
      many: the wheel's main cost at scale);
    - ``CART_MAX_LINES`` / ``CART_MAX_QTY``: carts beyond these are refused (DLQ
      ``cart_too_large``);
    - ``PROFILE_IDENTITY_LIMITS``: identifiers per kind a profile may hold, e.g.
      ``email=1,phone=2,loyalty_card=2,anonymous_id=5`` (the defaults);
    - ``PROFILE_BLOCKED_IDENTIFIERS``: extra placeholder values that identify nobody,
      comma-separated (``anonymous``, ``-1``, ``0``, all zeros... are always blocked);
    - ``PROFILE_MAX_PUSH_DEVICES``: push devices a profile keeps (the newest; older ones
      are dropped, logged and counted).
    """

    service_name: str = "customer-profile"
    # No shopper waits on its consumers: under load, events gather for a moment and are
    # handled in lots (see ServiceSettings.consumer_linger_ms).
    consumer_linger_ms: int = Field(default=100, ge=0, le=1000)
    outbox_relay_linger_ms: int = Field(default=50, ge=0, le=1000)
    cart_abandonment_delay: Duration = timedelta(hours=1)
    cart_timer_poll_s: float = Field(default=0.5, gt=0)
    cart_timer_batch: int = Field(default=500, gt=0)
    cart_timer_per_transaction: int = Field(default=50, gt=0)
    # Abandonment transactions fired at once when many carts are due.
    cart_timer_concurrency: int = Field(default=3, gt=0)
    cart_max_lines: int = Field(default=200, gt=0)
    cart_max_qty: int = Field(default=999, gt=0)
    profile_identity_limits: str = ""
    profile_blocked_identifiers: str = ""
    # Push devices (Web Push subscriptions and app tokens) a profile keeps: the newest.
    profile_max_push_devices: int = Field(default=10, gt=0, le=50)
