"""Loyalty settings: the platform's plus the rules of the programme (env vars, 12-factor)."""

from __future__ import annotations

import itertools
from datetime import timedelta
from decimal import Decimal
from typing import Literal

from omni_common.settings import ServiceSettings
from pydantic import Field, field_validator

from loyalty_service.domain.model import EarnRules, Tier


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{item!r} is not NAME=VALUE")
        pairs.append((name.strip(), value.strip()))
    return pairs


class LoyaltySettings(ServiceSettings):
    """Settings of the loyalty service; each is also an env var of the same name, upper case.

    - ``LOYALTY_POINTS_PER_UNIT``: points earned per currency unit spent (default 1);
    - ``LOYALTY_ROUNDING``: ``down`` (default), ``half_up`` or ``up``, per SKU of a purchase;
    - ``LOYALTY_POINT_VALUE``: what one point is worth at checkout (default 0.01);
    - ``LOYALTY_TIERS``: ``name=qualifying_spend:multiplier`` in rising order, the first
      at spend 0 (``base=0:1,silver=500:1.25,gold=1500:1.5``);
    - ``LOYALTY_PENDING_DAYS``: earned points are pending until the return window closes;
    - ``LOYALTY_EXPIRY_MONTHS``: points expire after this long without activity; a notice
      goes ``LOYALTY_EXPIRY_NOTICE_DAYS`` before;
    - ``LOYALTY_HOLD_MINUTES``: a hold neither redeemed nor released by then is released;
    - ``LOYALTY_OFFER_REWARD`` / ``LOYALTY_OFFER_DAYS``: the reward of a co-purchase offer
      and how long it is valid.
    """

    service_name: str = "loyalty"
    # No shopper waits on its consumers: under load, events gather for a moment and are
    # handled in lots (see ServiceSettings.consumer_linger_ms).
    consumer_linger_ms: int = Field(default=100, ge=0, le=1000)
    outbox_relay_linger_ms: int = Field(default=50, ge=0, le=1000)

    loyalty_points_per_unit: Decimal = Field(default=Decimal(1), ge=0)
    loyalty_point_value: Decimal = Field(default=Decimal("0.01"), gt=0)
    loyalty_rounding: Literal["down", "half_up", "up"] = "down"
    loyalty_tiers: str = "base=0:1,silver=500:1.25,gold=1500:1.5"
    loyalty_pending_days: float = Field(default=14.0, ge=0)
    loyalty_expiry_months: float = Field(default=24.0, gt=0)
    loyalty_expiry_notice_days: float = Field(default=14.0, ge=0)
    loyalty_hold_minutes: float = Field(default=24 * 60.0, gt=0)
    loyalty_offer_reward: str = "10%"
    loyalty_offer_days: float = Field(default=14.0, gt=0)
    loyalty_timer_poll_s: float = Field(default=0.5, gt=0)
    loyalty_max_page_size: int = Field(default=200, ge=1)

    @field_validator("loyalty_tiers")
    @classmethod
    def _valid_tiers(cls, value: str) -> str:
        parse_tiers(value)
        return value

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The tiers, lowest first."""
        return parse_tiers(self.loyalty_tiers)

    @property
    def rules(self) -> EarnRules:
        """The earning and spending rules as the domain takes them."""
        return EarnRules(
            points_per_unit=self.loyalty_points_per_unit,
            point_value=self.loyalty_point_value,
            tiers=self.tiers,
            rounding=self.loyalty_rounding,
        )

    @property
    def pending_window(self) -> timedelta:
        """How long earned points stay pending."""
        return timedelta(days=self.loyalty_pending_days)

    @property
    def expiry_after(self) -> timedelta:
        """Inactivity after which points expire (a month counted as 30.44 days)."""
        return timedelta(days=self.loyalty_expiry_months * 30.44)

    @property
    def expiry_notice(self) -> timedelta:
        """How long before expiry the shopper is warned."""
        return timedelta(days=self.loyalty_expiry_notice_days)

    @property
    def hold_ttl(self) -> timedelta:
        """How long a hold may stay unsettled."""
        return timedelta(minutes=self.loyalty_hold_minutes)

    @property
    def offer_validity(self) -> timedelta:
        """How long an offer can be used."""
        return timedelta(days=self.loyalty_offer_days)


def parse_tiers(text: str) -> tuple[Tier, ...]:
    """``base=0:1,silver=500:1.25`` as tiers, lowest first; ValueError when malformed."""
    tiers = []
    for name, spec in _pairs(text):
        spend, sep, multiplier = spec.partition(":")
        tiers.append(
            Tier(name=name, spend=Decimal(spend), multiplier=Decimal(multiplier if sep else "1"))
        )
    if not tiers or tiers[0].spend != 0:
        raise ValueError("the first tier must start at spend 0")
    if any(b.spend <= a.spend for a, b in itertools.pairwise(tiers)):
        raise ValueError("tiers must be in rising order of spend")
    return tuple(tiers)
