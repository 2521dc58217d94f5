"""Use cases: turn triggers into decided notifications (the dispatcher sends them).

Every use case takes the transaction (``Tx``) it runs in. A decision is one of: suppressed
(with the reason), deferred to the next slot inside the shopper's contact budget and outside
quiet hours (a durable timer decides it again then, with whatever else of the shopper's is
due by then), or pending (the dispatcher records the intent, calls the provider, records the
outcome; pending marketing messages of one shopper go as one digest). Decisions for one
shopper are serialised by an advisory lock, so the budget and the duplicate check hold with
several instances.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from omni_common.handlers import Clock
from omni_common.service import Tx
from omni_common.timers import cancel_timer, cancel_timers, set_timer
from omni_contracts import (
    AvailabilityChanged,
    CartAbandoned,
    Consents,
    Line,
    NotificationChannel,
    NotificationDeferred,
    NotificationSuppressed,
    OfferIssued,
    OrderCancelled,
    OrderConfirmed,
    OrderDelayed,
    OrderEvent,
    OrderPlaced,
    OrderReadyForPickup,
    PointsExpiring,
    Preferences,
    PreferencesUpdated,
    RefundIssued,
    StockAlertRequested,
    SuppressionReason,
    TierChanged,
    utcnow,
)
from omni_contracts.envelope import Envelope

from notification_service.adapters.metrics import NotificationMetrics
from notification_service.adapters.repository import NotificationRepository, NotificationRow
from notification_service.adapters.sets import NewNotification, NotificationSets
from notification_service.domain.model import (
    KINDS,
    Contact,
    Purpose,
    Reason,
    Status,
    check_cart,
    next_slot,
    route,
)
from notification_service.settings import NotificationSettings

log = logging.getLogger(__name__)

DEFERRED_TIMER = "notification.deferred"
CART_REMINDER_TIMER = "cart.reminder"
# One per SKU x location whose shoppers are being told it is back: key ["sku", "location"].
STOCK_ALERT_TIMER = "stock_alert.fanout"


@dataclass(frozen=True)
class Trigger:
    """A reason to tell a shopper something."""

    customer_id: str
    kind: str
    dedup_key: str | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def purpose(self) -> Purpose:
        """Transactional or marketing, from the kind."""
        return KINDS[self.kind].purpose


@dataclass(frozen=True)
class Verdict:
    """What the rules say of a message now: its status, why, until when it is deferred, and
    until when it waits for others to join its digest."""

    status: Status
    reason: Reason | None = None
    until: datetime | None = None
    not_before: datetime | None = None


@dataclass(frozen=True)
class Decision:
    """What was decided for one trigger."""

    notification_id: str
    status: Status
    reason: Reason | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class Ask:
    """A trigger to decide, with what caused it (an event, or a timer that remembered
    its cause) and a refusal already known."""

    trigger: Trigger
    envelope: Envelope | None
    refusal: Reason | None = None
    caused_by: str | None = None
    correlation_id: str | None = None


def _contract_reason(reason: Reason) -> SuppressionReason | None:
    try:
        return SuppressionReason(reason.value)
    except ValueError:
        return None


class Notifier:
    """Decides notifications; ``wake`` tells the dispatcher that one is pending."""

    def __init__(
        self,
        settings: NotificationSettings,
        metrics: NotificationMetrics,
        wake: Callable[[], None] = lambda: None,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.wake = wake
        self.clock = clock

    # -- deciding --------------------------------------------------------------------------

    async def notify(
        self,
        tx: Tx,
        trigger: Trigger,
        envelope: Envelope | None,
        *,
        refusal: Reason | None = None,
        caused_by: str | None = None,
        correlation_id: str | None = None,
    ) -> Decision:
        """Decide ``trigger``: duplicate, refused, suppressed, deferred or pending.

        ``caused_by`` and ``correlation_id`` stand for the envelope's when the trigger comes
        from a timer that remembered them."""
        ask = Ask(trigger, envelope, refusal, caused_by, correlation_id)
        return (await self.notify_all(tx, [ask]))[0]

    async def notify_all(self, tx: Tx, asks: Sequence[Ask]) -> list[Decision]:
        """Decide a lot of triggers, in order, as :meth:`notify` decides one: the shoppers
        are locked, their contacts and the dedup keys read, and the decisions written, each
        with one statement for the lot."""
        repo = NotificationRepository(tx.conn)
        sets = NotificationSets(tx.conn)
        await sets.lock_customers({a.trigger.customer_id for a in asks})
        taken = await sets.taken_dedup_keys(
            {a.trigger.dedup_key for a in asks if a.trigger.dedup_key}
        )
        contacts = await sets.contacts({a.trigger.customer_id for a in asks})
        rows: list[NewNotification] = []
        decisions: list[Decision] = []
        for a in asks:
            trigger, refusal, dedup_key = a.trigger, a.refusal, a.trigger.dedup_key
            if dedup_key and dedup_key in taken:
                refusal, dedup_key = Reason.DUPLICATE, None
            elif dedup_key:
                taken.add(dedup_key)
            if refusal is not None:
                verdict = Verdict(Status.SUPPRESSED, refusal)
            else:
                if self.settings.purpose_policy(trigger.purpose).deferred:
                    # The budget and the digest count what is recorded: the lot's earlier
                    # decisions are written first.
                    await sets.insert_notifications(rows)
                    rows = []
                verdict = await self._evaluate(
                    repo,
                    contacts.get(trigger.customer_id),
                    trigger.customer_id,
                    trigger.purpose,
                    self.clock(),
                )
            decision = Decision(str(uuid.uuid4()), verdict.status, verdict.reason, verdict.until)
            rows.append(
                NewNotification(
                    notification_id=decision.notification_id,
                    customer_id=trigger.customer_id,
                    dedup_key=dedup_key,
                    kind=trigger.kind,
                    purpose=trigger.purpose.value,
                    status=verdict.status.value,
                    reason=verdict.reason.value if verdict.reason else None,
                    params=trigger.params,
                    deferred_until=verdict.until,
                    correlation_id=a.envelope.correlation_id if a.envelope else a.correlation_id,
                    caused_by=a.envelope.id if a.envelope else a.caused_by,
                    not_before=verdict.not_before,
                )
            )
            decisions.append(decision)
        await sets.insert_notifications(rows)
        for a, decision in zip(asks, decisions, strict=True):
            await self._announce(tx, a.trigger.customer_id, a.trigger.kind, decision, a.envelope)
        return decisions

    async def _evaluate(
        self,
        repo: NotificationRepository,
        contact: Contact | None,
        customer_id: str,
        purpose: Purpose,
        first_decided: datetime,
    ) -> Verdict:
        """Route and consent, then the contact budget and quiet hours for what waits for
        them: go now (alone, or with the digest waiting to go), or wait for the next slot."""
        routed = route(contact, purpose)
        if routed.refusal is not None:
            return Verdict(Status.SUPPRESSED, routed.refusal)
        assert contact is not None
        policy = self.settings.purpose_policy(purpose)
        if not policy.deferred:
            # Order updates go at once, whatever the budget (they count in it).
            return Verdict(Status.PENDING)
        now = self.clock()
        if policy.digest and (waiting := await repo.open_digest(customer_id)) is not None:
            # A message of the same purpose is about to go: this one goes with it, in one
            # digest, one contact. It was allowed in the budget and outside quiet hours.
            return Verdict(Status.PENDING, not_before=waiting.not_before)
        budget = self.settings.budget
        contacts = await repo.contacts_since(
            customer_id,
            now - budget.window,
            transactional=self.settings.purpose_policy(Purpose.TRANSACTIONAL).counted,
        )
        slot, why = next_slot(
            now, contacts, budget, contact.preferences, self.settings.notify_default_time_zone
        )
        if why is None:
            wait = self.settings.notify_digest_wait_s
            return Verdict(
                Status.PENDING, not_before=now + timedelta(seconds=wait) if wait else None
            )
        if slot - first_decided > timedelta(hours=self.settings.notify_defer_max_hours):
            # Held that long it would no longer be news.
            return Verdict(Status.SUPPRESSED, Reason.THROTTLED)
        return Verdict(Status.DEFERRED, why, until=slot)

    async def _announce(
        self, tx: Tx, customer_id: str, kind: str, decision: Decision, envelope: Envelope | None
    ) -> None:
        """Tell the world what was decided (through the outbox) and arm what comes next."""
        if decision.status is Status.SUPPRESSED:
            assert decision.reason is not None
            reason = _contract_reason(decision.reason)
            if reason is not None:
                await tx.emit(
                    NotificationSuppressed(
                        customer_id=customer_id,
                        notification_id=decision.notification_id,
                        reason=reason,
                        template=kind,
                    ),
                    caused_by=envelope,
                )
            reason_value = decision.reason.value
            tx.after_commit(lambda: self.metrics.outcome(kind, "suppressed", reason_value))
        elif decision.status is Status.DEFERRED:
            assert decision.until is not None and decision.reason is not None
            why = decision.reason.value
            await set_timer(
                tx.conn,
                DEFERRED_TIMER,
                decision.notification_id,
                decision.until,
                {"customer_id": customer_id},
            )
            await tx.emit(
                NotificationDeferred(
                    customer_id=customer_id,
                    notification_id=decision.notification_id,
                    until=decision.until,
                    template=kind,
                    reason=why,
                ),
                caused_by=envelope,
            )
            tx.after_commit(lambda: self.metrics.outcome(kind, "deferred", why))
        else:
            # Once committed the dispatcher can see it: wake it rather than wait for its poll.
            tx.after_commit(self.wake)

    async def deferred_due(self, tx: Tx, notification_id: str) -> None:
        """Timer: a deferred message's slot came; decide it again (consent, the budget, quiet
        hours, a cart bought meanwhile), with the shopper's other deferred messages that are
        due by now: they come due together, so they go together (one digest)."""
        repo = NotificationRepository(tx.conn)
        row = await repo.get(notification_id, lock=True)
        if row is None or row.status != Status.DEFERRED.value:
            return
        await repo.lock_customer(row.customer_id)
        due = [
            row,
            *await repo.deferred_due(
                row.customer_id, self.clock(), DEFERRED_TIMER, exclude=notification_id
            ),
        ]
        for each in sorted(due, key=lambda r: r.created_at):
            await self._decide_again(tx, repo, each)

    async def _decide_again(
        self, tx: Tx, repo: NotificationRepository, row: NotificationRow
    ) -> None:
        verdict: Verdict | None = None
        if row.kind == "cart_reminder":
            params, refusal = await self._recheck_cart(repo, row)
            if params != row.params:
                await tx.conn.execute(
                    "UPDATE notifications SET params = $2 WHERE notification_id = $1",
                    row.notification_id,
                    json.dumps(params),
                )
            if refusal is not None:
                verdict = Verdict(Status.SUPPRESSED, refusal)
        if verdict is None:
            verdict = await self._evaluate(
                repo,
                await repo.contact(row.customer_id),
                row.customer_id,
                Purpose(row.purpose),
                row.created_at,
            )
        await repo.decide(
            row.notification_id,
            verdict.status.value,
            reason=verdict.reason.value if verdict.reason else None,
            deferred_until=verdict.until,
            not_before=verdict.not_before,
        )
        decision = Decision(row.notification_id, verdict.status, verdict.reason, verdict.until)
        await self._announce(tx, row.customer_id, row.kind, decision, None)

    # -- carts -----------------------------------------------------------------------------

    async def _recheck_cart(
        self, repo: NotificationRepository, row: NotificationRow
    ) -> tuple[dict[str, Any], Reason | None]:
        params = dict(row.params)
        items = [Line.model_validate(i) for i in params.get("all_items", [])]
        check = check_cart(
            items,
            closed=await repo.cart_closed(params["cart_id"]),
            bought_since=await repo.bought_since(
                row.customer_id,
                [i.sku for i in items],
                datetime.fromisoformat(params["last_activity_at"]),
            ),
            online_available=await repo.online_available([i.sku for i in items]),
        )
        params["items"] = [_item(i) for i in check.remaining]
        return params, check.refusal

    async def cart_abandoned(
        self, tx: Tx, cart: CartAbandoned, envelope: Envelope | None, step: int = 1
    ) -> Decision:
        """Remind the shopper of what is left of the cart (step 1 arms step 2)."""
        repo = NotificationRepository(tx.conn)
        skus = [i.sku for i in cart.items]
        check = check_cart(
            cart.items,
            closed=await repo.cart_closed(cart.cart_id),
            bought_since=await repo.bought_since(cart.customer_id, skus, cart.last_activity_at),
            online_available=await repo.online_available(skus),
        )
        params = {
            "cart_id": cart.cart_id,
            "step": step,
            "items": [_item(i) for i in check.remaining],
            "all_items": [i.model_dump(mode="json") for i in cart.items],
            "last_activity_at": cart.last_activity_at.isoformat(),
            "cart_url": f"{self.settings.shop_url.rstrip('/')}/cart/{cart.cart_id}",
            "url": f"{self.settings.shop_url.rstrip('/')}/cart/{cart.cart_id}",
            "offer": await repo.current_offer(cart.customer_id, self.clock()),
        }
        # One reminder per step of one abandonment: a cart abandoned again after new activity
        # is news again.
        abandonment = f"cart:{cart.cart_id}:{cart.last_activity_at.isoformat()}"
        trigger = Trigger(cart.customer_id, "cart_reminder", f"{abandonment}:{step}", params)
        decision = await self.notify(tx, trigger, envelope, refusal=check.refusal)
        alert_url = f"{self.settings.shop_url.rstrip('/')}/alerts?cart={cart.cart_id}"
        if check.refusal is Reason.OUT_OF_STOCK and step == 1:
            # Nothing left to buy: offer to say when it is back instead.
            await self.notify(
                tx,
                Trigger(
                    cart.customer_id,
                    "stock_alert_offer",
                    f"{abandonment}:stock_alert_offer",
                    {
                        "cart_id": cart.cart_id,
                        "skus": list(check.out_of_stock),
                        "alert_url": alert_url,
                        "url": alert_url,
                    },
                ),
                envelope,
            )
        if step == 1 and check.refusal is not Reason.ALREADY_BOUGHT:
            await set_timer(
                tx.conn,
                CART_REMINDER_TIMER,
                cart.cart_id,
                self.clock() + self.settings.cart_reminder_second_after,
                {"customer_id": cart.customer_id, "cart": cart.model_dump(mode="json")},
            )
        return decision

    async def second_reminder_due(self, tx: Tx, payload: dict[str, Any]) -> None:
        """Timer: the cart is still abandoned a day later; re-check and remind again."""
        cart = CartAbandoned.model_validate(payload["cart"])
        await self.cart_abandoned(tx, cart, None, step=2)

    async def cart_bought(self, tx: Tx, cart_id: str, why: str) -> None:
        """A checkout or an order closed the cart: no reminder from now on."""
        await NotificationRepository(tx.conn).close_cart(cart_id, why)
        await cancel_timer(tx.conn, CART_REMINDER_TIMER, cart_id)

    async def orders_placed(self, tx: Tx, orders: Sequence[OrderPlaced]) -> None:
        """Remember what shoppers bought (store sales too): carts holding it are done."""
        bought: dict[tuple[str, str], datetime] = {}
        carts: dict[str, str] = {}
        for order in orders:
            if order.customer_id is None:
                continue
            for line in order.lines:
                key = (order.customer_id, line.sku)
                bought[key] = max(order.occurred_at, bought.get(key, order.occurred_at))
            if order.cart_id:
                carts[order.cart_id] = "order_placed"
        sets = NotificationSets(tx.conn)
        await sets.record_purchases(bought)
        await sets.close_carts(carts)
        await cancel_timers(tx.conn, CART_REMINDER_TIMER, list(carts))

    # -- orders ----------------------------------------------------------------------------

    async def order_updates(
        self, tx: Tx, events: Sequence[tuple[OrderEvent, Envelope]]
    ) -> list[Decision]:
        """Confirmed, ready for pickup, delayed, cancelled, refunded: tell the shoppers."""
        asks = [
            Ask(trigger, envelope)
            for event, envelope in events
            if (trigger := order_trigger(event)) is not None
        ]
        return await self.notify_all(tx, asks) if asks else []

    # -- back in stock ---------------------------------------------------------------------

    async def stock_alert_requested(
        self, tx: Tx, event: StockAlertRequested, envelope: Envelope
    ) -> None:
        """Sign the shopper up for one back-in-stock message."""
        await NotificationRepository(tx.conn).add_stock_alert(
            envelope.id, event.customer_id, event.sku, event.location_id
        )

    async def availability_changed(
        self, tx: Tx, changes: Sequence[tuple[AvailabilityChanged, Envelope]]
    ) -> None:
        """Keep the latest availability; when it may satisfy alerts, arm their fan-out.

        The shoppers waiting are told in bounded batches, each its own transaction (the
        fan-out timer, :meth:`alerts_due`): however many wait, the event's transaction stays
        small, and a fan-out stopped half-way resumes where it was.
        """
        sets = NotificationSets(tx.conn)
        await sets.save_availabilities([c for c, _ in changes])
        back = [(c, e) for c, e in changes if c.available > 0 or c.online_available > 0]
        awaited = await sets.skus_awaited({c.sku for c, _ in back})
        for change, envelope in back:
            if change.sku not in awaited:
                continue
            await set_timer(
                tx.conn,
                STOCK_ALERT_TIMER,
                json.dumps([change.sku, change.location_id]),
                self.clock(),
                {
                    "sku": change.sku,
                    "location_id": change.location_id,
                    "caused_by": envelope.id,
                    "correlation_id": envelope.correlation_id,
                },
            )

    async def alerts_due(self, tx: Tx, payload: dict[str, Any]) -> list[Decision]:
        """Timer: tell one batch of the shoppers waiting for a SKU that it is back (at the
        store, or online), as availability stands now; arm the next batch if there may be
        more. Each alert fires once."""
        repo = NotificationRepository(tx.conn)
        sku, location_id = payload["sku"], payload["location_id"]
        store = await repo.store_available(sku, location_id) > 0
        online = (await repo.online_available([sku])).get(sku, 0) > 0
        batch = self.settings.notify_fanout_batch
        alerts = await repo.take_alerts(sku, location_id, store, online, batch)
        decisions = []
        # Shoppers in one order in every batch: concurrent batches lock them alike.
        for alert in sorted(alerts, key=lambda a: (a["customer_id"], a["alert_id"])):
            product = f"{self.settings.shop_url.rstrip('/')}/products/{alert['sku']}"
            params = {
                "sku": alert["sku"],
                "location_id": alert["location_id"],
                "product_url": product,
                "url": product,
            }
            trigger = Trigger(
                alert["customer_id"], "back_in_stock", f"stock_alert:{alert['alert_id']}", params
            )
            decisions.append(
                await self.notify(
                    tx,
                    trigger,
                    None,
                    caused_by=payload.get("caused_by"),
                    correlation_id=payload.get("correlation_id"),
                )
            )
        if len(alerts) == batch:
            await set_timer(
                tx.conn, STOCK_ALERT_TIMER, json.dumps([sku, location_id]), self.clock(), payload
            )
        return decisions

    # -- loyalty ---------------------------------------------------------------------------

    async def loyalty(
        self, tx: Tx, event: TierChanged | OfferIssued | PointsExpiring, envelope: Envelope
    ) -> Decision:
        """Tier changed, offer issued, points about to expire."""
        entry = event.entry_id or envelope.id
        params: dict[str, Any] = {"balance": event.balance}
        if isinstance(event, TierChanged):
            kind = "loyalty_tier_changed"
            params |= {"tier": event.tier or "", "previous_tier": event.previous_tier}
        elif isinstance(event, OfferIssued):
            kind = "loyalty_offer_issued"
            entry = event.offer_id or entry
            valid_until = event.valid_until or event.expires_at
            await NotificationRepository(tx.conn).save_offer(
                f"{event.customer_id}:{entry}",
                event.customer_id,
                description=event.description,
                sku=event.sku,
                reward=event.reward,
                valid_until=valid_until,
            )
            params |= {
                "description": event.description,
                "reward": event.reward,
                "sku": event.sku,
                "valid_until": _iso(valid_until),
            }
        else:
            kind = "loyalty_points_expiring"
            params |= {
                "expiring_points": event.expiring_points,
                "expires_at": _iso(event.expires_at),
            }
        return await self.notify(
            tx, Trigger(event.customer_id, kind, f"loyalty:{kind}:{entry}", params), envelope
        )

    # -- consent and erasure ---------------------------------------------------------------

    async def unsubscribe(self, tx: Tx, customer_id: str, channel: str, purpose: str) -> None:
        """One-click unsubscribe: stop here at once, and tell the profile (which owns consent)."""
        await NotificationRepository(tx.conn).withdraw_consent(customer_id, purpose, channel)
        no = Consents(**{NotificationChannel(channel).value: False})
        prefs = (
            Preferences(consents=no)
            if purpose == Purpose.MARKETING.value
            else Preferences(transactional_consents=no)
        )
        await tx.emit(PreferencesUpdated(customer_id=customer_id, preferences=prefs))

    async def erase(self, tx: Tx, customer_id: str) -> int:
        """Forget the shopper's contacts and message bodies; nothing more goes out to them."""
        stopped = await NotificationRepository(tx.conn).erase(customer_id)
        for notification_id in stopped:
            await cancel_timer(tx.conn, DEFERRED_TIMER, notification_id)
        return len(stopped)


def order_trigger(event: OrderEvent) -> Trigger | None:
    """What to tell the shopper of an order's news (none for an anonymous store sale)."""
    if event.customer_id is None:
        return None  # an anonymous store sale: nobody to tell
    params: dict[str, Any] = {"order_id": event.order_id, "channel": event.channel.value}
    dedup = f"order:{event.order_id}:{event.ce_type}"
    if isinstance(event, OrderConfirmed):
        kind = "order_confirmed"
        params["promised_by"] = _iso(event.promised_by)
    elif isinstance(event, OrderReadyForPickup):
        kind = "order_ready_for_pickup"
        params |= {"store": event.location_id or "", "collect_by": _iso(event.collect_by)}
    elif isinstance(event, OrderDelayed):
        kind = "order_delayed"
        params |= {"promised_by": _iso(event.promised_by), "eta": _iso(event.eta)}
        dedup = f"{dedup}:{_iso(event.eta)}"  # a later ETA is news again
    elif isinstance(event, OrderCancelled):
        kind = "order_cancelled"
        params["reason"] = event.reason
    elif isinstance(event, RefundIssued):
        kind = "order_refund_issued"
        params |= {
            "return_id": event.return_id,
            "amount": f"{event.amount.amount} {event.amount.currency}",
        }
        dedup = f"{dedup}:{event.return_id}"
    else:
        return None
    return Trigger(event.customer_id, kind, dedup, params)


def _item(line: Line) -> dict[str, Any]:
    return {
        "sku": line.sku,
        "qty": line.qty,
        "unit_price": f"{line.unit_price.amount} {line.unit_price.currency}",
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
