"""What every use case needs besides the transaction, and what it reports back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from omni_common.handlers import Clock
from omni_common.service import Tx
from omni_contracts import utcnow

from customer_profile_service.adapters.repository import ProfileRepository
from customer_profile_service.domain import DEFAULT_BLOCKED, DEFAULT_LIMITS, CartLimits, IdKind

CART_ABANDONMENT = "cart-abandonment"
"""Timer kind: a cart with items untouched for the abandonment delay."""


@dataclass(frozen=True)
class Profiles:
    """The service's policy: identity guards, cart bounds and the abandonment delay."""

    limits: Mapping[IdKind, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    blocked: frozenset[str] = DEFAULT_BLOCKED
    cart_limits: CartLimits = field(default_factory=CartLimits)
    abandonment_delay: timedelta = timedelta(hours=1)
    # Push devices (Web Push subscriptions and app tokens) a profile keeps: the newest.
    max_devices: int = 10
    # Advisory locks are database-wide: named after the schema they guard.
    lock_namespace: str = "customer_profile"
    clock: Clock = utcnow

    def repo(self, tx: Tx) -> ProfileRepository:
        """The repository on ``tx``'s connection."""
        return ProfileRepository(tx.conn)


@dataclass
class Outcome:
    """What a use case changed, for the caller to observe once committed."""

    # Profiles whose snapshot must be republished (surviving ids).
    changed: set[str] = field(default_factory=set)
    skipped_identifiers: list[tuple[str, str]] = field(default_factory=list)
    merges: int = 0
    unmerges: int = 0
    # Push devices dropped beyond the bound (oldest first) or found gone.
    devices_dropped: int = 0
    snapshots: int = 0
    cart_skips: list[str] = field(default_factory=list)
    erased: int = 0
