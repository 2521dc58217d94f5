"""The loyalty service's use cases: one method per thing that happens to points.

Every change runs in the transaction it is given (``tx``, opened by the runtime for an
event, by a route or a timer): the inbox record of the event that caused it, the ledger
entries (:class:`Ledger`), the account's buckets, the timers and the ``loyalty.ledger.v1``
events (through the outbox) commit together or not at all.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from omni_common.service import ServiceRuntime, Tx
from omni_common.timers import cancel_timer, set_timer
from omni_contracts import (
    AvailabilityChanged,
    LedgerEvent,
    Money,
    OfferIssued,
    OrderCancelled,
    OrderConfirmed,
    OrderDelivered,
    OrderPickedUp,
    OrderPlaced,
    OrderRejected,
    OrderReturnReceived,
    OrderShipped,
    OrderStatus,
    PointsAvailable,
    PointsEarned,
    PointsExpired,
    PointsExpiring,
    PointsHeld,
    PointsPending,
    PointsRedeemed,
    PointsRefused,
    PointsReleased,
    PointsReversed,
    ProfileErased,
    ProfilesMerged,
    ProfilesUnmerged,
    ProfileUpdated,
    TierChanged,
    utcnow,
)
from omni_contracts.envelope import Envelope

from loyalty_service.adapters.metrics import LoyaltyMetrics
from loyalty_service.adapters.repository import Entry, LoyaltyRepository, OrderRecord
from loyalty_service.domain.model import (
    Account,
    Buckets,
    EntryKind,
    give_back,
    pairs,
    pick_offer,
    refusal,
    reversal,
    review,
    upgrade,
)
from loyalty_service.settings import LoyaltySettings

log = logging.getLogger(__name__)

PENDING_TIMER = "loyalty.pending"
"""Timer kind: an order's pending points become available (key: order_id)."""
HOLD_TIMER = "loyalty.hold"
"""Timer kind: a hold never settled is released (key: order_id)."""
EXPIRY_TIMER = "loyalty.expiry"
"""Timer kind: points expire after inactivity (key: account_id)."""
EXPIRY_NOTICE_TIMER = "loyalty.expiry_notice"
"""Timer kind: the notice before expiry (key: account_id)."""
TIER_REVIEW_TIMER = "loyalty.tier_review"
"""Timer kind: a tier's review date (key: account_id)."""

YEAR = timedelta(days=365)
LOYALTY = "loyalty"

_EVENTS: dict[EntryKind, type[LedgerEvent]] = {
    EntryKind.PENDING: PointsPending,
    EntryKind.EARNED: PointsEarned,
    EntryKind.AVAILABLE: PointsAvailable,
    EntryKind.HELD: PointsHeld,
    EntryKind.REDEEMED: PointsRedeemed,
    EntryKind.RELEASED: PointsReleased,
    EntryKind.REVERSED: PointsReversed,
    EntryKind.EXPIRED: PointsExpired,
}


@dataclass
class Ledger:
    """The points ledger as one transaction writes it: entries posted and published, caused
    by one event (or none), and counted once committed."""

    tx: Tx
    envelope: Envelope | None
    metrics: LoyaltyMetrics
    repo: LoyaltyRepository = field(init=False)
    written: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.repo = LoyaltyRepository(self.tx.conn)
        self.tx.after_commit(lambda: self.metrics.written(self.written))  # now it is true

    @property
    def conn(self) -> Any:
        """The transaction's connection (timers are set on it)."""
        return self.tx.conn

    async def post(
        self,
        account: Account,
        kind: EntryKind,
        change: Buckets,
        *,
        points: int,
        reason: str,
        cause: str,
        at: datetime,
        order_id: str | None = None,
        origin: int | None = None,
        **extra: Any,
    ) -> Entry | None:
        """Append a ledger entry and publish it (when the account has a customer to tell).
        ``origin``: the merged account whose points these are, if not the account's own."""
        entry = await self.repo.post(
            account,
            kind,
            change,
            points=points,
            reason=reason,
            cause=cause,
            order_id=order_id,
            at=at,
            origin=origin,
        )
        if entry is None:
            return None
        self.written.append((kind.value, points))
        model = _EVENTS.get(kind)
        if model is not None and account.announced:
            assert account.customer_id is not None
            await self.emit(
                model(
                    customer_id=account.customer_id,
                    points=points,
                    balance=entry.balance,
                    reason=reason,
                    order_id=order_id,
                    entry_id=str(entry.entry_id),
                    occurred_at=at,
                    **extra,
                )
            )
        return entry

    async def emit(self, event: LedgerEvent) -> None:
        """Publish a ledger event with the transaction (caused by the incoming event)."""
        correlation = self.envelope.correlation_id if self.envelope else None
        await self.tx.emit(event, caused_by=self.envelope, correlation_id=correlation)


class UnknownAccount(LookupError):
    """No (or an erased) loyalty account for a customer."""


class NotEnoughPoints(ValueError):
    """A correction would take the spendable balance below zero."""

    def __init__(self, available: int) -> None:
        super().__init__(f"only {available} points are available")
        self.available = available


class LoyaltyService:
    """Applies orders, profiles, stock and timers to the points ledger."""

    def __init__(
        self,
        settings: LoyaltySettings,
        metrics: LoyaltyMetrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.rules = settings.rules
        self.metrics = metrics
        self.clock = clock

    def ledger(self, tx: Tx, envelope: Envelope | None = None) -> Ledger:
        """The ledger as ``tx`` writes it, caused by ``envelope`` (if an event)."""
        return Ledger(tx, envelope, self.metrics)

    # -- lots: what most events need, with one statement per table -----------------------

    async def orders_placed(self, tx: Tx, orders: Sequence[tuple[OrderPlaced, Envelope]]) -> None:
        """Remember placed orders, their buyers' accounts opened, all at once. In-store sales
        earn at once, and orders awaiting loyalty hold points: those go through
        :meth:`order_placed`."""
        if any(o.points_to_redeem and LOYALTY in (o.awaiting or ()) for o, _ in orders):
            # A hold decides on the account as the orders before it left it: one by one.
            for order, envelope in orders:
                await self.order_placed(tx, order, envelope)
            return
        online = [(o, e) for o, e in orders if o.status is not OrderStatus.COMPLETED]
        repo = LoyaltyRepository(tx.conn)
        named = [o.customer_id for o, _ in online if o.customer_id]
        accounts = await repo.ensure_customer_accounts(named)
        origins = await repo.origins(named)
        records: list[OrderRecord] = []
        for order, _ in online:
            account = accounts.get(order.customer_id) if order.customer_id else None
            origin = origins.get(order.customer_id) if order.customer_id else None
            if account is None and order.loyalty_card:
                account, origin = await repo.card_account(order.loyalty_card)
            if account is not None and account.erased:
                account, origin = None, None
            records.append(_order_record(order, account, origin))
        await repo.add_orders(records)
        for order, envelope in orders:
            if order.status is OrderStatus.COMPLETED:
                await self.order_placed(tx, order, envelope)

    async def orders_confirmed(
        self, tx: Tx, orders: Sequence[tuple[OrderConfirmed, Envelope]]
    ) -> None:
        """Confirmed orders spend the points held for them (most held none: one look)."""
        holds = await LoyaltyRepository(tx.conn).holds([o.order_id for o, _ in orders])
        for order, envelope in orders:
            if order.order_id in holds:
                await self.order_confirmed(tx, order, envelope)

    async def profiles_updated(
        self, tx: Tx, profiles: Sequence[tuple[ProfileUpdated, Envelope]]
    ) -> None:
        """Profiles: their accounts opened (all at once), preferred stores kept, cards
        linked (each card collects for its customer; points it collected move)."""
        now = self.clock()
        repo = LoyaltyRepository(tx.conn)
        accounts = await repo.ensure_customer_accounts([p.customer_id for p, _ in profiles])
        stores: dict[int, str | None] = {}
        for profile, envelope in profiles:
            account = accounts[profile.customer_id]
            if account.erased:
                continue
            current = stores.get(account.account_id, account.preferred_store)
            if profile.preferred_store != current:
                stores[account.account_id] = profile.preferred_store
            cards = {
                *profile.loyalty_cards,
                *([profile.loyalty_card] if profile.loyalty_card else []),
            }
            for card in sorted(cards):
                await self._link(self.ledger(tx, envelope), card, account, now)
        await repo.set_preferred_stores(stores)

    async def stock_changed(
        self, tx: Tx, changes: Sequence[tuple[AvailabilityChanged, Envelope]]
    ) -> None:
        """Keep the stock that offers are filtered by (the newest figure of each row)."""
        await LoyaltyRepository(tx.conn).record_stocks(
            [
                (c.sku, c.location_id, c.available, c.online_available, c.changed_at)
                for c, _ in changes
            ]
        )

    # -- order.lifecycle.v1 ---------------------------------------------------------------

    async def order_placed(self, tx: Tx, event: OrderPlaced, envelope: Envelope) -> None:
        """Remember the order; hold its points if it awaits loyalty; a store sale earns."""
        w = self.ledger(tx, envelope)
        now = self.clock()
        if event.points_to_redeem and LOYALTY in (event.awaiting or ()):
            await self._hold(w, event, now)
        account, origin = await self._buyer(w, event)
        record = _order_record(event, account, origin)
        if not await w.repo.add_order(record):
            return
        if event.status is OrderStatus.COMPLETED:  # an in-store sale: bought now
            await self._purchased(w, record, account, now)

    async def order_confirmed(self, tx: Tx, event: OrderConfirmed, envelope: Envelope) -> None:
        """The order is confirmed: its held points are spent."""
        w = self.ledger(tx, envelope)
        hold = await w.repo.hold(event.order_id)
        if hold is None:
            return
        now = self.clock()
        account = await w.repo.account(hold["account_id"])
        points, origin = hold["points"], hold["origin_account"]
        if hold["status"] == "held":
            await w.post(
                account,
                EntryKind.REDEEMED,
                Buckets(held=-points),
                points=0,
                reason="order_confirmed",
                cause=f"redeem:{event.order_id}",
                order_id=event.order_id,
                at=now,
                origin=origin,
            )
        elif hold["status"] == "released":
            # The hold timed out before the order was confirmed: spend the points now
            # if they are still there (the hold window is far longer than the saga's).
            if account.available >= points:
                await w.post(
                    account,
                    EntryKind.REDEEMED,
                    Buckets(available=-points),
                    points=-points,
                    reason="order_confirmed",
                    cause=f"redeem:{event.order_id}",
                    order_id=event.order_id,
                    at=now,
                    origin=origin,
                )
            else:
                self.metrics.unrecovered.labels(self.metrics.service, "redemption").inc(points)
                log.error("order %s confirmed after its hold lapsed", event.order_id)
                return
        else:
            return
        await w.repo.settle_hold(event.order_id, "redeemed")
        await cancel_timer(w.conn, HOLD_TIMER, event.order_id)
        order = await w.repo.order(event.order_id)
        if order is not None:
            order.redeemed = points
            await w.repo.save_order_returns(order)
        await self._active(w, account, now)

    async def order_ended(
        self, tx: Tx, event: OrderRejected | OrderCancelled, envelope: Envelope
    ) -> None:
        """Rejected or cancelled: held points go back; points spent on it are given back."""
        w = self.ledger(tx, envelope)
        await self._release(w, event.order_id, event.ce_type.rsplit(".", 1)[-1], self.clock())

    async def order_fulfilled(
        self, tx: Tx, event: OrderPickedUp | OrderShipped | OrderDelivered, envelope: Envelope
    ) -> None:
        """Picked up, shipped or delivered: the purchase earns (once)."""
        w = self.ledger(tx, envelope)
        order = await w.repo.order(event.order_id)
        if order is None or order.account_id is None:
            return  # not seen placed, or an anonymous shopper
        account = await w.repo.account(order.account_id)
        await self._purchased(w, order, account, self.clock())

    async def return_received(self, tx: Tx, event: OrderReturnReceived, envelope: Envelope) -> None:
        """Items came back: reverse the points earned on them, give back points spent."""
        w = self.ledger(tx, envelope)
        order = await w.repo.order(event.order_id)
        if order is None or order.account_id is None:
            return
        now = self.clock()
        account = await w.repo.account(order.account_id)
        returned: dict[str, int] = {}
        for line in event.lines:
            returned[line.sku] = returned.get(line.sku, 0) + line.qty
        value = _returned_value(order, returned)
        earning = await w.repo.earning(event.order_id)
        if earning is not None:
            points, after = reversal(earning.lines, earning.returned, returned)
            points = min(points, earning.points - earning.reversed)
            if points > 0:
                if earning.status == "pending":
                    change = Buckets(pending=-points, lifetime=-points)
                else:
                    # Points already spendable (a late return): take what is there; the
                    # rest is counted as unrecovered, the balance never goes negative.
                    taken = min(points, account.available)
                    if taken < points:
                        self.metrics.unrecovered.labels(self.metrics.service, "return").inc(
                            points - taken
                        )
                    change = Buckets(available=-taken, lifetime=-points)
                await w.post(
                    account,
                    EntryKind.REVERSED,
                    change,
                    points=-points,
                    reason="items_returned",
                    cause=f"return:{event.return_id}:earned",
                    order_id=event.order_id,
                    at=now,
                    origin=order.origin_account,
                )
            earning.reversed += max(points, 0)
            earning.returned = after
            await w.repo.save_earning(earning)
        back = min(
            give_back(order.redeemed, order.gross, order.returned_value, value),
            order.redeemed - order.given_back,
        )
        if back > 0:
            await w.post(
                account,
                EntryKind.REVERSED,
                Buckets(available=back),
                points=back,
                reason="redeemed_on_returned_items",
                cause=f"return:{event.return_id}:redeemed",
                order_id=event.order_id,
                at=now,
                origin=order.origin_account,
            )
            order.given_back += back
        order.returned_value += value
        await w.repo.save_order_returns(order)
        # Qualifying spend shrinks; the tier only follows at its review date.
        await w.repo.add_spend(
            account.account_id, f"return:{event.return_id}", -value, now, order.origin_account
        )

    # -- customer.profile.v1 --------------------------------------------------------------

    async def profile_erased(self, tx: Tx, event: ProfileErased, envelope: Envelope) -> None:
        """Erasure: pseudonymise the account (the ledger keeps only figures)."""
        w = self.ledger(tx, envelope)
        account_id = await w.repo.erase(event.customer_id)
        if account_id is not None:
            for kind in (EXPIRY_NOTICE_TIMER, TIER_REVIEW_TIMER):
                await cancel_timer(w.conn, kind, str(account_id))

    # -- inventory.availability.v1 --------------------------------------------------------

    # -- corrections ----------------------------------------------------------------------

    async def adjust(
        self, tx: Tx, customer_id: str, *, adjustment_id: str, points: int, reason: str, by: str
    ) -> Entry | None:
        """A manual correction of a shopper's spendable points, once per ``adjustment_id``.

        Published as ``loyalty.points.earned`` (added) or ``loyalty.points.reversed``
        (taken). Raises :class:`UnknownAccount`, or :class:`NotEnoughPoints` when it would
        take the balance below zero; returns None when this adjustment was applied before.
        """
        w = self.ledger(tx)
        account = await w.repo.customer_account(customer_id)
        if account is None or account.erased:
            raise UnknownAccount(customer_id)
        if account.available + points < 0:
            raise NotEnoughPoints(account.available)
        kind = EntryKind.EARNED if points > 0 else EntryKind.REVERSED
        now = self.clock()
        entry = await w.post(
            account,
            kind,
            Buckets(available=points, lifetime=max(points, 0)),
            points=points,
            reason=f"adjusted:{reason}",
            cause=f"adjust:{adjustment_id}",
            at=now,
            origin=await w.repo.origin(customer_id),
        )
        if entry is not None:
            log.info("points adjusted by %s (%+d)", by, points)
            await self._active(w, account, now)
        return entry

    # -- reads ----------------------------------------------------------------------------

    async def account_view(
        self, runtime: ServiceRuntime, customer_id: str
    ) -> dict[str, Any] | None:
        """The account as the read API shows it, or None."""
        async with runtime.pool.acquire() as conn:
            repo = LoyaltyRepository(conn)
            account = await repo.customer_account(customer_id, lock=False)
            if account is None or account.erased or account.customer_id != customer_id:
                return None  # unknown, erased, or merged (its account is the survivor's)
            offer = await repo.open_offer(account.account_id, self.clock())
        next_expiry = (
            account.last_activity_at + self.settings.expiry_after
            if account.available > 0 and account.last_activity_at
            else None
        )
        return {
            "customer_id": customer_id,
            "available": account.available,
            "pending": account.pending,
            "held": account.held,
            "lifetime": account.lifetime,
            "tier": account.tier,
            "tier_review_at": account.tier_review_at,
            "next_expiry": next_expiry,
            "points_value": str(self.rules.value_of(account.available)),
            "open_offer": dict(offer) if offer else None,
        }

    async def ledger_page(
        self, runtime: ServiceRuntime, customer_id: str, *, limit: int, before: int | None
    ) -> list[dict[str, Any]] | None:
        """A page of the account's entries (newest first), or None for an unknown account."""
        async with runtime.pool.acquire() as conn:
            repo = LoyaltyRepository(conn)
            account = await repo.customer_account(customer_id, lock=False)
            if account is None or account.erased or account.customer_id != customer_id:
                return None  # unknown, erased, or merged (its account is the survivor's)
            return await repo.entries(account.account_id, limit=limit, before=before)

    # -- the saga -------------------------------------------------------------------------

    async def _hold(self, w: Ledger, event: OrderPlaced, now: datetime) -> None:
        wanted = event.points_to_redeem or 0
        if await w.repo.hold(event.order_id) is not None:
            return  # the same order again (a resend): it holds already
        account = await w.repo.customer_account(event.customer_id) if event.customer_id else None
        if account is not None and account.erased:
            account = None
        origin = await w.repo.origin(event.customer_id) if account is not None else None
        reason = refusal(account is not None, account.available if account else 0, wanted)
        if reason is None and account is not None:
            entry = await w.post(
                account,
                EntryKind.HELD,
                Buckets(available=-wanted, held=wanted),
                points=-wanted,
                reason="checkout",
                cause=f"hold:{event.order_id}",
                order_id=event.order_id,
                at=now,
                origin=origin,
                value=Money(
                    amount=self.rules.value_of(wanted), currency=event.lines[0].unit_price.currency
                ),
            )
            if entry is not None:
                await w.repo.add_hold(event.order_id, account.account_id, wanted, origin)
                await set_timer(w.conn, HOLD_TIMER, event.order_id, now + self.settings.hold_ttl)
                await self._active(w, account, now)
            return
        assert reason is not None
        # Counted once committed: a lot that rolls back is handled again, one by one.
        w.tx.after_commit(self.metrics.refusals.labels(self.metrics.service, reason.value).inc)
        if event.customer_id is None:
            return  # nobody to answer for: the order waits for its timers
        await w.emit(
            PointsRefused(
                customer_id=event.customer_id,
                balance=account.available if account else 0,
                reason=reason,
                requested=wanted,
                order_id=event.order_id,
                occurred_at=now,
            )
        )

    async def _release(self, w: Ledger, order_id: str, why: str, now: datetime) -> None:
        hold = await w.repo.hold(order_id)
        if hold is None:
            return
        account = await w.repo.account(hold["account_id"])
        points, origin = hold["points"], hold["origin_account"]
        if hold["status"] == "held":
            await w.post(
                account,
                EntryKind.RELEASED,
                Buckets(available=points, held=-points),
                points=points,
                reason=f"order_{why}",
                cause=f"release:{order_id}",
                order_id=order_id,
                at=now,
                origin=origin,
            )
            await w.repo.settle_hold(order_id, "released")
            await cancel_timer(w.conn, HOLD_TIMER, order_id)
        elif hold["status"] == "redeemed":
            # Cancelled after confirmation: what was spent on it comes back.
            order = await w.repo.order(order_id)
            back = points if order is None else order.redeemed - order.given_back
            if back > 0:
                await w.post(
                    account,
                    EntryKind.RELEASED,
                    Buckets(available=back),
                    points=back,
                    reason=f"order_{why}",
                    cause=f"refund:{order_id}",
                    order_id=order_id,
                    at=now,
                    origin=origin,
                )
                if order is not None:
                    order.given_back = order.redeemed
                    await w.repo.save_order_returns(order)

    async def hold_expired(self, tx: Tx, order_id: str) -> None:
        w = self.ledger(tx)
        await self._release(w, order_id, "hold_expired", self.clock())

    # -- earning --------------------------------------------------------------------------

    async def _buyer(self, w: Ledger, event: OrderPlaced) -> tuple[Account | None, int | None]:
        """The account a purchase earns on: the customer's, else the till's card's; with the
        merged account it earns for, if the id or card was merged into that account."""
        if event.customer_id:
            account = await w.repo.ensure_customer_account(event.customer_id)
            if account.erased:
                return None, None
            return account, await w.repo.origin(event.customer_id)
        if event.loyalty_card:
            return await w.repo.card_account(event.loyalty_card)
        return None, None

    async def _purchased(
        self, w: Ledger, order: OrderRecord, account: Account | None, now: datetime
    ) -> None:
        """A purchase completed: learn the basket, earn (pending), tiers, an offer."""
        skus = [line["sku"] for line in order.lines]
        if account is None:
            await w.repo.record_basket(None, pairs(skus))
            return
        share = self._paid_share(order)
        lines = [(ln["sku"], ln["qty"], Decimal(ln["unit_price"]) * share) for ln in order.lines]
        earned = self.rules.earn(lines, account.tier)
        available_at = now + self.settings.pending_window
        origin = order.origin_account
        if not await w.repo.add_earning(
            order.order_id, account.account_id, earned, available_at, origin
        ):
            return  # earned before (shipped, then delivered)
        await w.repo.record_basket(account.account_id, pairs(skus))
        points = sum(line.points for line in earned)
        if points > 0:
            await w.post(
                account,
                EntryKind.PENDING,
                Buckets(pending=points, lifetime=points),
                points=points,
                reason="purchase",
                cause=f"earn:{order.order_id}",
                order_id=order.order_id,
                at=now,
                origin=origin,
            )
        await set_timer(w.conn, PENDING_TIMER, order.order_id, available_at)
        # Qualifying spend is money spent: what points paid for does not qualify.
        spent = (order.gross * share).quantize(Decimal("0.01"))
        await w.repo.add_spend(account.account_id, f"order:{order.order_id}", spent, now, origin)
        await self._maybe_upgrade(w, account, now)
        await self._active(w, account, now)
        await self._offer(w, account, skus, order.order_id, now)
        await w.repo.record_purchases(account.account_id, skus)

    def _paid_share(self, order: OrderRecord) -> Decimal:
        # Points earn on what was paid in money, not on what redeemed points paid for.
        if not order.redeemed or order.gross <= 0:
            return Decimal(1)
        value = self.rules.value_of(order.redeemed)
        return max(order.gross - value, Decimal(0)) / order.gross

    async def pending_closed(self, tx: Tx, order_id: str) -> None:
        w = self.ledger(tx)
        earning = await w.repo.earning(order_id)
        if earning is None or earning.status != "pending":
            return
        account = await w.repo.account(earning.account_id)
        remaining = earning.points - earning.reversed
        if remaining > 0:
            await w.post(
                account,
                EntryKind.AVAILABLE,
                Buckets(available=remaining, pending=-remaining),
                points=remaining,
                reason="return_window_closed",
                cause=f"available:{order_id}",
                order_id=order_id,
                at=self.clock(),
                origin=earning.origin_account,
            )
        earning.status = "available"
        await w.repo.save_earning(earning)

    async def _link(self, w: Ledger, card: str, account: Account, now: datetime) -> None:
        known = await w.repo.card(card)
        if known is None:
            if await w.repo.claim_card(card, account.account_id):
                return  # a new card: it collects for the customer from now on
            # A sale registered the card at the same moment (its insert won): move from it.
            known = await w.repo.card(card)
            assert known is not None
        card_account_id, owner = known
        if card_account_id == account.account_id:
            return
        if owner is not None:
            log.warning("card already linked to another account; left as is")
            return
        source = await w.repo.account(card_account_id)
        await self._absorb(w, source, account, f"link:{card}:{card_account_id}", "card_linked", now)
        await w.repo.link_card(card, account.account_id)
        await self._active(w, account, now)

    async def _absorb(
        self,
        w: Ledger,
        source: Account,
        target: Account,
        cause: str,
        reason: str,
        now: datetime,
        *,
        attributed: bool = False,
    ) -> None:
        """Move everything ``source`` holds (points, orders, holds, purchases) to ``target``.

        The source gets one ``moved_out`` entry emptying its buckets; the target one entry
        per bucket, published as earned (spendable) and pending points. ``attributed`` (a
        merge): the target's entries and the moved orders, earnings, holds and spend stay
        the source's (``origin_account``), so an unmerge can give them back.
        """
        moved = Buckets(
            available=source.available,
            pending=source.pending,
            held=source.held,
            lifetime=source.lifetime,
        )
        out = await w.post(
            source,
            EntryKind.MOVED_OUT,
            _negated(moved),
            points=-(moved.available + moved.pending + moved.held),
            reason=reason,
            cause=f"{cause}:out",
            at=now,
        )
        if out is None:
            return  # moved before
        origin = source.account_id if attributed else None
        await self._move_in(w, target, moved, cause, reason, now, origin=origin)
        await w.repo.move_belongings(source.account_id, target.account_id, attributed=attributed)

    async def _move_in(
        self,
        w: Ledger,
        target: Account,
        moved: Buckets,
        cause: str,
        reason: str,
        now: datetime,
        *,
        origin: int | None = None,
    ) -> None:
        """Points moved in from another account: one entry per bucket, spendable points
        published as earned, pending as pending."""
        if moved.available > 0:
            await w.post(
                target,
                EntryKind.EARNED,
                Buckets(available=moved.available),
                points=moved.available,
                reason=reason,
                cause=f"{cause}:available",
                at=now,
                origin=origin,
            )
        if moved.pending > 0:
            await w.post(
                target,
                EntryKind.PENDING,
                Buckets(pending=moved.pending),
                points=moved.pending,
                reason=reason,
                cause=f"{cause}:pending",
                at=now,
                origin=origin,
            )
        if moved.held > 0 or moved.lifetime > 0:
            # Held points stay held (their orders are settled on the target now); lifetime
            # follows. Not a change of the spendable balance: recorded, not published.
            await w.post(
                target,
                EntryKind.ADJUSTED,
                Buckets(held=moved.held, lifetime=moved.lifetime),
                points=0,
                reason=reason,
                cause=f"{cause}:rest",
                at=now,
                origin=origin,
            )

    async def profiles_merged(self, tx: Tx, event: ProfilesMerged, envelope: Envelope) -> None:
        """Profiles of one shopper were merged: the merged accounts move to the survivor.

        Each merged id is kept (``merged_customers``) with its own account, so what events
        naming it do from now on posts on the survivor's account as the merged account's,
        and an unmerge gives back what was its own. An erased id is not merged (it stays
        erased and names its pseudonymised account).
        """
        w = self.ledger(tx, envelope)
        now = self.clock()
        target = await w.repo.ensure_customer_account(event.surviving_id)
        for merged_id in sorted(set(event.merged_ids)):
            if await w.repo.erased_account(merged_id) is not None:
                continue
            if await w.repo.merged_customer(merged_id) is not None:
                continue  # merged before (into this survivor, or one merged into it since)
            source = await w.repo.customer_account(merged_id)
            if source is not None and source.account_id == target.account_id:
                continue  # merged before
            if source is not None:
                await self._absorb(
                    w,
                    source,
                    target,
                    f"merge:{source.account_id}:{envelope.id}",
                    "profiles_merged",
                    now,
                    attributed=True,
                )
            await w.repo.retire(merged_id, source.account_id if source else None, target.account_id)
        await self._active(w, target, now)

    async def profiles_unmerged(self, tx: Tx, event: ProfilesUnmerged, envelope: Envelope) -> None:
        """A merge was undone: what the survivor's account holds as the restored account's
        (the points it brought, and those earned, held or redeemed since under its id or
        its cards) moves back to it, with its orders, earnings, holds, spend and cards; the
        restored id names its own account again.

        Never below zero: a bucket gives back at most what the survivor's account has (the
        rest is counted as unrecovered). Nothing happens for an id not merged here (or
        merged before merges were kept), nor again for one restored already. An erased
        restored id stays erased: its points go to its pseudonymised account, unpublished.
        """
        w = self.ledger(tx, envelope)
        merged = await w.repo.merged_customer(event.restored_id)
        if merged is None:
            log.info("unmerge of an id not merged here; nothing to move back")
            return
        own, into = merged
        erased = await w.repo.erased_account(event.restored_id)
        target_id = erased if erased is not None else own
        locked = {i: await w.repo.account(i) for i in sorted({own, into, target_id})}
        source, target = locked[into], locked[target_id]
        if erased is None:
            await w.repo.restore(event.restored_id, own)
            target.customer_id = event.restored_id
        else:
            await w.repo.restore(event.restored_id, None)
        now = self.clock()
        share = await w.repo.share(into, own)
        moved = Buckets(
            available=_within(share.available, source.available),
            pending=_within(share.pending, source.pending),
            held=_within(share.held, source.held),
            lifetime=_within(share.lifetime, source.lifetime),
        )
        short = max(share.available - moved.available, 0) + max(share.pending - moved.pending, 0)
        if short:
            self.metrics.unrecovered.labels(self.metrics.service, "unmerge").inc(short)
            log.warning("unmerge: %d points of the restored account were no longer there", short)
        cause = f"unmerge:{own}:{envelope.id}"
        if moved != Buckets():
            spendable = moved.available + moved.pending
            await w.post(
                source,
                EntryKind.REVERSED if spendable else EntryKind.ADJUSTED,
                _negated(moved),
                points=-spendable,
                reason="profiles_unmerged",
                cause=f"{cause}:out",
                at=now,
                origin=own,
            )
            await self._move_in(w, target, moved, cause, "profiles_unmerged", now)
        await w.repo.move_back(into, own, target.account_id)
        if target.announced:
            await self._active(w, target, now)

    # -- tiers ----------------------------------------------------------------------------

    async def _maybe_upgrade(self, w: Ledger, account: Account, now: datetime) -> None:
        spend = await w.repo.spend_since(account.account_id, now - YEAR)
        tier = upgrade(self.rules, account.tier, spend)
        if tier is None:
            return
        await self._change_tier(w, account, tier.name, now, reason="qualifying_spend")

    async def _change_tier(
        self, w: Ledger, account: Account, tier: str, now: datetime, *, reason: str
    ) -> None:
        previous = account.tier
        review_at = now + YEAR if self.rules.rank(tier) > 0 else None
        await w.repo.set_tier(account.account_id, tier, review_at)
        account.tier, account.tier_review_at = tier, review_at
        if review_at is not None:
            await set_timer(w.conn, TIER_REVIEW_TIMER, str(account.account_id), review_at)
        else:
            await cancel_timer(w.conn, TIER_REVIEW_TIMER, str(account.account_id))
        if account.announced:
            assert account.customer_id is not None
            await w.emit(
                TierChanged(
                    customer_id=account.customer_id,
                    balance=account.available,
                    reason=reason,
                    tier=tier,
                    previous_tier=previous,
                    occurred_at=now,
                )
            )

    async def tier_review(self, tx: Tx, key: str) -> None:
        w = self.ledger(tx)
        now = self.clock()
        account = await w.repo.account(int(key))
        spend = await w.repo.spend_since(account.account_id, now - YEAR)
        tier = review(self.rules, account.tier, spend)
        if tier is None:
            # Kept: reviewed again in a year.
            await w.repo.set_tier(account.account_id, account.tier, now + YEAR)
            await set_timer(w.conn, TIER_REVIEW_TIMER, key, now + YEAR)
            return
        await self._change_tier(w, account, tier.name, now, reason="tier_review")

    # -- expiry ---------------------------------------------------------------------------

    async def _active(self, w: Ledger, account: Account, now: datetime) -> None:
        """The shopper did something: expiry (and its notice) count from now."""
        await w.repo.touch(account.account_id, now)
        expires = now + self.settings.expiry_after
        key = str(account.account_id)
        await set_timer(w.conn, EXPIRY_TIMER, key, expires)
        await set_timer(
            w.conn,
            EXPIRY_NOTICE_TIMER,
            key,
            max(now, expires - self.settings.expiry_notice),
            {"expires_at": expires.isoformat()},
        )

    async def expiry_notice(self, tx: Tx, key: str, payload: dict[str, Any]) -> None:
        w = self.ledger(tx)
        account = await w.repo.account(int(key))
        if account.available <= 0 or not account.announced:
            return
        assert account.customer_id is not None
        await w.emit(
            PointsExpiring(
                customer_id=account.customer_id,
                balance=account.available,
                reason="inactivity",
                expiring_points=account.available,
                expires_at=datetime.fromisoformat(payload["expires_at"]),
                occurred_at=self.clock(),
            )
        )

    async def expire(self, tx: Tx, key: str) -> None:
        w = self.ledger(tx)
        account = await w.repo.account(int(key))
        if account.available <= 0:
            return
        assert account.last_activity_at is not None
        await w.post(
            account,
            EntryKind.EXPIRED,
            Buckets(available=-account.available),
            points=-account.available,
            reason="inactivity",
            cause=f"expire:{key}:{account.last_activity_at.isoformat()}",
            at=self.clock(),
        )

    # -- offers ---------------------------------------------------------------------------

    async def _offer(
        self, w: Ledger, account: Account, skus: list[str], order_id: str, now: datetime
    ) -> None:
        if not account.announced or await w.repo.open_offer(account.account_id, now):
            return  # at most one open offer per shopper
        together = await w.repo.bought_together(sorted(set(skus)))
        if not together:
            return
        stocked = await w.repo.in_stock([sku for sku, _ in together], account.preferred_store)
        bought = {*await w.repo.bought(account.account_id), *skus}
        sku = pick_offer(together, bought=bought, in_stock=stocked)
        if sku is None:
            return
        offer_id = f"offer_{uuid.uuid4().hex}"
        reward = self.settings.loyalty_offer_reward
        until = await w.repo.add_offer(
            offer_id, account.account_id, sku, reward, self.settings.offer_validity, now
        )
        assert account.customer_id is not None
        await w.emit(
            OfferIssued(
                customer_id=account.customer_id,
                balance=account.available,
                reason="bought_together",
                order_id=order_id,
                offer_id=offer_id,
                sku=sku,
                reward=reward,
                valid_until=until,
                expires_at=until,
                occurred_at=now,
            )
        )
        w.tx.after_commit(self.metrics.offers.labels(self.metrics.service).inc)


def _negated(change: Buckets) -> Buckets:
    """The opposite change of every bucket."""
    return Buckets(
        available=-change.available,
        pending=-change.pending,
        held=-change.held,
        lifetime=-change.lifetime,
    )


def _within(share: int, there: int) -> int:
    """What of ``share`` can move: never below zero, never more than is ``there``."""
    return max(0, min(share, there))


def _returned_value(order: OrderRecord, returned: dict[str, int]) -> Decimal:
    """The value at order prices of the returned units (never beyond what was bought)."""
    value = Decimal(0)
    for sku, qty in returned.items():
        left = qty
        for line in order.lines:
            if line["sku"] != sku or left <= 0:
                continue
            take = min(left, line["qty"])
            value += Decimal(line["unit_price"]) * take
            left -= take
    return value


def _order_record(
    order: OrderPlaced, account: Account | None, origin: int | None = None
) -> OrderRecord:
    """A placed order as loyalty keeps it (``origin``: the merged account it is for)."""
    return OrderRecord(
        order_id=order.order_id,
        account_id=account.account_id if account else None,
        channel=order.channel.value,
        currency=order.lines[0].unit_price.currency,
        gross=sum((ln.unit_price.amount * ln.qty for ln in order.lines), Decimal(0)),
        lines=[
            {"sku": ln.sku, "qty": ln.qty, "unit_price": str(ln.unit_price.amount)}
            for ln in order.lines
        ],
        points_to_redeem=order.points_to_redeem,
        redeemed=0,
        given_back=0,
        returned_value=Decimal(0),
        origin_account=origin if account else None,
    )
