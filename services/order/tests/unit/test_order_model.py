"""The order aggregate, pure: state machine, saga, fulfilment, delays, returns and refunds."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from omni_contracts import (
    Allocation,
    CheckoutSubmitted,
    OrderCancelled,
    OrderConfirmed,
    OrderDelayed,
    OrderPlaced,
    OrderRejected,
    OrderReturnReceived,
    OrderStatus,
    RefundIssued,
    ReturnLine,
    SaleRecorded,
    Shortage,
)
from order_service.domain.errors import (
    IllegalTransition,
    InvalidOrder,
    NothingToReturn,
    ReturnConflict,
)
from order_service.domain.model import (
    INVENTORY,
    LOYALTY,
    TRANSITIONS,
    Order,
    can_transition,
    refund_amount,
    required_participants,
)

S = OrderStatus
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
WINDOW = timedelta(days=7)


def money(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "EUR"}


def checkout(
    *,
    lines: list[tuple[str, int, str]] = (("SKU-1", 2, "10.00"), ("SKU-2", 1, "5.50")),
    pickup: str | None = None,
    authorized: str | None = None,
    points: int | None = None,
) -> CheckoutSubmitted:
    total = sum(Decimal(p) * q for _, q, p in lines)
    fulfillment = (
        {"type": "pickup", "location_id": pickup}
        if pickup
        else {
            "type": "delivery",
            "address": {
                "line1": "1 Main St",
                "city": "Lyon",
                "postal_code": "69001",
                "country": "FR",
            },
        }
    )
    return CheckoutSubmitted(
        checkout_id="chk-1",
        customer_id="cust-1",
        channel="web",
        lines=[{"sku": s, "qty": q, "unit_price": money(p)} for s, q, p in lines],
        fulfillment=fulfillment,
        payment={"reference": "pay-1", "authorized": money(authorized or str(total))},
        points_to_redeem=points,
        occurred_at=NOW,
    )


def placed(participants: frozenset[str] = frozenset({INVENTORY}), **kwargs) -> Order:
    order = Order.from_checkout(
        checkout(**kwargs), order_id="o-1", correlation_id="c-1", participants=participants, now=NOW
    )
    drain(order)
    return order


def confirmed(**kwargs) -> Order:
    order = placed(**kwargs)
    assert order.participant_confirmed(INVENTORY, NOW)
    drain(order)
    return order


def drain(order: Order) -> list:
    events = list(order.events)
    order.events.clear()
    order.transitions.clear()
    order.new_returns.clear()
    return events


def delivered(**kwargs) -> Order:
    order = confirmed(**kwargs)
    order.shipped(NOW, carrier="dhl", tracking_id="t1", promised_by=NOW + timedelta(days=2))
    order.delivered(NOW)
    drain(order)
    return order


# -- state machine ---------------------------------------------------------------------------


def test_every_status_has_a_row_and_terminal_states_go_nowhere() -> None:
    assert set(TRANSITIONS) == set(OrderStatus)
    for status in (S.REJECTED, S.CANCELLED, S.REFUNDED):
        assert not TRANSITIONS[status]
    assert can_transition(S.PLACED, S.CONFIRMED)
    assert not can_transition(S.SHIPPED, S.CANCELLED)
    assert not can_transition(S.PLACED, S.SHIPPED)


def test_an_illegal_transition_is_refused_and_changes_nothing() -> None:
    order = placed()
    with pytest.raises(IllegalTransition) as refused:
        order.delivered(NOW)
    assert refused.value.current is S.PLACED and refused.value.wanted is S.DELIVERED
    assert order.status is S.PLACED
    assert order.events == [] and order.transitions == []


# -- placing ---------------------------------------------------------------------------------


def test_a_checkout_becomes_a_placed_order_announcing_lines_and_fulfillment() -> None:
    order = Order.from_checkout(
        checkout(pickup="store-1"),
        order_id="o-1",
        correlation_id="c",
        participants={INVENTORY},
        now=NOW,
    )
    (event,) = order.events
    assert isinstance(event, OrderPlaced)
    assert event.status is S.PLACED and event.channel == "web" and event.customer_id == "cust-1"
    assert event.fulfillment.location_id == "store-1"
    assert [(ln.sku, ln.qty) for ln in event.lines] == [("SKU-1", 2), ("SKU-2", 1)]
    assert event.total.amount == Decimal("25.50")
    assert order.paid == Decimal("25.50") and order.pending_confirmations == {INVENTORY}
    assert order.transitions == [S.PLACED]


BOTH = frozenset({INVENTORY, LOYALTY})


def test_a_payment_that_does_not_cover_the_order_is_refused_unless_points_pay_the_rest() -> None:
    with pytest.raises(InvalidOrder):
        placed(authorized="20.00")
    # Points without loyalty in the saga pay nothing: the payment alone must cover.
    with pytest.raises(InvalidOrder):
        placed(authorized="20.00", points=500)
    order = placed(BOTH, authorized="20.00", points=500)
    assert order.paid == Decimal("20.00")


def test_loyalty_yes_confirms_only_when_payment_plus_held_points_cover_the_total() -> None:
    # total 25.50, 20.00 authorised: points worth 5.50 or more cover it
    order = placed(BOTH, authorized="20.00", points=550)
    assert order.participant_confirmed(INVENTORY, NOW)
    assert order.participant_confirmed(LOYALTY, NOW, points_value=Decimal("5.50"))
    assert order.status is S.CONFIRMED
    assert order.paid == Decimal("20.00")  # the rest was paid in points

    short = placed(BOTH, authorized="20.00", points=500)
    assert short.participant_confirmed(INVENTORY, NOW)
    drain(short)
    assert short.participant_confirmed(LOYALTY, NOW, points_value=Decimal("5.00"))
    (event,) = short.events
    assert isinstance(event, OrderRejected) and event.reason == "payment_insufficient"
    assert short.status is S.REJECTED

    # a yes that says nothing about value covers nothing
    silent = placed(BOTH, authorized="20.00", points=500)
    silent.participant_confirmed(LOYALTY, NOW)
    assert silent.status is S.REJECTED


def test_points_worth_more_than_needed_leave_the_money_due_at_the_remainder() -> None:
    order = placed(BOTH, authorized="25.50", points=1000)
    assert order.participant_confirmed(LOYALTY, NOW, points_value=Decimal("10.00"))
    assert order.paid == Decimal("15.50")
    assert order.participant_confirmed(INVENTORY, NOW)
    assert order.status is S.CONFIRMED


def test_the_placed_event_says_whom_the_order_awaits() -> None:
    order = Order.from_checkout(
        checkout(authorized="10.00", points=2000),
        order_id="o-1",
        correlation_id="c-1",
        participants=BOTH,
        now=NOW,
    )
    (event,) = order.events
    assert isinstance(event, OrderPlaced) and event.awaiting == ["inventory", "loyalty"]


def test_an_in_store_sale_is_born_completed_at_its_store() -> None:
    sale = SaleRecorded(
        sale_id="sale-9",
        location_id="store-7",
        lines=[{"sku": "SKU-1", "qty": 1, "unit_price": money("3.00")}],
        occurred_at=NOW,
    )
    order = Order.from_store_sale(sale, order_id="o-9", correlation_id="c", now=NOW)
    (event,) = order.events
    assert isinstance(event, OrderPlaced)
    assert event.status is S.COMPLETED and event.channel == "store" and event.sale_id == "sale-9"
    assert event.customer_id is None and event.loyalty_card is None and event.awaiting is None
    assert event.fulfillment.type == "pickup" and event.fulfillment.location_id == "store-7"
    assert order.pending_confirmations == set()


# -- the saga --------------------------------------------------------------------------------


def test_inventory_yes_confirms_with_the_allocations() -> None:
    order = placed()
    allocations = [Allocation(sku="SKU-1", location_id="wh-1", qty=2)]
    assert order.participant_confirmed(INVENTORY, NOW, allocations=allocations)
    (event,) = order.events
    assert isinstance(event, OrderConfirmed)
    assert event.model_dump(mode="json")["allocations"] == [
        {"sku": "SKU-1", "location_id": "wh-1", "qty": 2}
    ]
    assert order.status is S.CONFIRMED


def test_with_two_participants_the_order_waits_for_both_and_the_first_no_rejects() -> None:
    both = frozenset({INVENTORY, LOYALTY})
    order = placed(participants=both, points=100)
    assert order.participant_confirmed(INVENTORY, NOW)
    assert order.status is S.PLACED and order.events == []
    assert not order.participant_confirmed(INVENTORY, NOW)  # repeated answer
    assert order.participant_confirmed(LOYALTY, NOW, points_value=Decimal("1.00"))
    assert order.status is S.CONFIRMED

    other = placed(participants=both, points=100)
    shortage = Shortage(sku="SKU-1", requested=2, available=1)
    assert other.participant_rejected(INVENTORY, "insufficient_stock", NOW, shortages=[shortage])
    (event,) = other.events
    assert isinstance(event, OrderRejected) and event.shortages == [shortage]
    # loyalty's late yes changes nothing: the rejection already told it to release
    assert not other.participant_confirmed(LOYALTY, NOW)
    assert other.status is S.REJECTED


def test_loyalty_joins_the_saga_only_when_enabled_and_points_are_redeemed() -> None:
    assert required_participants(100) == {INVENTORY}
    assert required_participants(100, loyalty_in_saga=True) == {INVENTORY, LOYALTY}
    assert required_participants(0, loyalty_in_saga=True) == {INVENTORY}


def test_an_expired_reservation_rejects_a_waiting_order_and_cancels_a_confirmed_one() -> None:
    waiting = placed()
    assert waiting.reservation_released("expired", NOW)
    assert waiting.status is S.REJECTED and waiting.reason == "reservation_expired"

    held = confirmed()
    assert held.reservation_released("expired", NOW)
    assert held.status is S.CANCELLED
    assert isinstance(held.events[0], OrderCancelled)

    cancelled = confirmed()
    cancelled.cancel("requested", NOW)
    drain(cancelled)
    assert not cancelled.reservation_released("order_cancelled", NOW)
    assert cancelled.events == []


# -- cancellation ----------------------------------------------------------------------------


def test_cancel_before_fulfilment_and_refuse_after_shipping() -> None:
    order = confirmed()
    assert order.cancel("changed my mind", NOW)
    assert order.status is S.CANCELLED and order.events[0].reason == "changed my mind"
    assert not order.cancel("again", NOW)  # harmless repeat

    shipped = confirmed()
    shipped.shipped(NOW, carrier="dhl", tracking_id="t1", promised_by=NOW + timedelta(days=2))
    drain(shipped)
    with pytest.raises(IllegalTransition):
        shipped.cancel("too late", NOW)
    assert shipped.status is S.SHIPPED and shipped.events == []


# -- pickup ----------------------------------------------------------------------------------


def test_pickup_ready_then_collected() -> None:
    order = confirmed(pickup="store-1")
    assert order.ready_for_pickup(NOW, window=WINDOW)
    assert order.collect_by == NOW + WINDOW
    assert order.events[0].location_id == "store-1"
    assert not order.ready_for_pickup(NOW, window=WINDOW)  # the store scanned it twice
    assert order.picked_up(NOW)
    assert order.status is S.PICKED_UP
    assert not order.pickup_not_collected(NOW)  # a timer firing late does nothing


def test_a_pickup_not_collected_is_cancelled() -> None:
    order = confirmed(pickup="store-1")
    order.ready_for_pickup(NOW, window=WINDOW)
    drain(order)
    assert order.pickup_not_collected(NOW + WINDOW)
    (event,) = order.events
    assert isinstance(event, OrderCancelled) and event.reason == "not_collected"


def test_a_delivery_order_cannot_be_picked_up_nor_a_pickup_order_shipped() -> None:
    with pytest.raises(IllegalTransition):
        confirmed().ready_for_pickup(NOW, window=WINDOW)
    with pytest.raises(IllegalTransition):
        confirmed(pickup="store-1").shipped(
            NOW, carrier="dhl", tracking_id="t", promised_by=NOW + timedelta(days=1)
        )


# -- delivery promises -----------------------------------------------------------------------


def shipped_order(promise: datetime) -> Order:
    order = confirmed()
    order.shipped(NOW, carrier="dhl", tracking_id="t1", promised_by=promise)
    drain(order)
    return order


def test_an_eta_past_the_promise_is_announced_once_per_new_eta() -> None:
    promise = NOW + timedelta(days=2)
    order = shipped_order(promise)
    assert not order.eta_changed(promise - timedelta(hours=1), NOW)  # still on time
    late = promise + timedelta(days=1)
    assert order.eta_changed(late, NOW)
    (event,) = drain(order)
    assert isinstance(event, OrderDelayed)
    assert (event.status, event.promised_by, event.eta) == (S.SHIPPED, promise, late)
    assert not order.eta_changed(late, NOW)  # the same ETA again
    assert order.eta_changed(late + timedelta(hours=5), NOW)  # later still: tell again
    # the promise timer fires: the shopper already knows the current ETA
    assert not order.promise_overdue(promise, extension=timedelta(hours=24))


def test_a_promise_passing_without_eta_announces_an_estimate() -> None:
    promise = NOW + timedelta(days=2)
    order = shipped_order(promise)
    assert order.promise_overdue(promise, extension=timedelta(hours=24))
    (event,) = order.events
    assert event.eta == promise + timedelta(hours=24)
    order.delivered(NOW + timedelta(days=3))
    assert not order.eta_changed(NOW + timedelta(days=9), NOW)  # delivered: nothing to say


# -- returns and refunds ---------------------------------------------------------------------


def returned(*items: tuple[str, int]) -> list[ReturnLine]:
    return [ReturnLine(sku=sku, qty=qty, resellable=True) for sku, qty in items]


def test_a_partial_then_a_final_return_refund_exactly_what_was_paid() -> None:
    order = delivered()
    assert order.receive_return(
        return_id="r1",
        location_id="store-3",
        channel="store",
        lines=returned(("SKU-1", 1)),
        now=NOW,
    )
    received, refund = drain(order)
    assert isinstance(received, OrderReturnReceived) and isinstance(refund, RefundIssued)
    assert received.status is S.PARTIALLY_RETURNED and received.location_id == "store-3"
    assert refund.amount.amount == Decimal("10.00") and refund.status is S.PARTIALLY_RETURNED

    order.receive_return(
        return_id="r2",
        location_id="wh-1",
        channel="web",
        lines=returned(("SKU-1", 1), ("SKU-2", 1)),
        now=NOW,
    )
    received, refund = drain(order)
    assert received.status is S.RETURNED
    assert refund.amount.amount == Decimal("15.50") and refund.status is S.REFUNDED
    assert order.refunded == order.paid == Decimal("25.50")
    assert order.status is S.REFUNDED


def test_a_repeated_return_has_one_effect_and_a_conflicting_one_is_refused() -> None:
    order = delivered()
    lines = returned(("SKU-1", 1))
    assert order.receive_return(
        return_id="r1", location_id="s", channel="store", lines=lines, now=NOW
    )
    drain(order)
    assert not order.receive_return(
        return_id="r1", location_id="s", channel="store", lines=lines, now=NOW
    )
    assert order.events == [] and order.refunded == Decimal("10.00")
    with pytest.raises(ReturnConflict):
        order.receive_return(
            return_id="r1", location_id="s", channel="store", lines=returned(("SKU-1", 2)), now=NOW
        )


def test_units_beyond_what_was_bought_are_not_accepted_nor_refunded() -> None:
    order = delivered()
    order.receive_return(
        return_id="r1",
        location_id="s",
        channel="store",
        lines=returned(("SKU-1", 5), ("NOT-BOUGHT", 1)),
        now=NOW,
    )
    received, refund = drain(order)
    assert [(ln.sku, ln.qty) for ln in received.lines] == [("SKU-1", 2)]
    assert refund.amount.amount == Decimal("20.00")
    assert list(order.returns) == ["r1"]
    with pytest.raises(NothingToReturn):
        order.receive_return(
            return_id="r2", location_id="s", channel="store", lines=returned(("SKU-1", 1)), now=NOW
        )


def test_nothing_can_be_returned_before_it_reached_the_shopper() -> None:
    order = confirmed()
    with pytest.raises(IllegalTransition):
        order.receive_return(
            return_id="r1", location_id="s", channel="store", lines=returned(("SKU-1", 1)), now=NOW
        )


def test_when_points_paid_part_returns_are_refunded_pro_rata_and_never_beyond_paid() -> None:
    # 3 x 10.00 bought, 20.00 paid (points covered the rest)
    order = Order.from_checkout(
        checkout(lines=[("SKU-1", 3, "10.00")], authorized="20.00", points=1000),
        order_id="o-1",
        correlation_id="c-1",
        participants=BOTH,
        now=NOW,
    )
    order.participant_confirmed(INVENTORY, NOW)
    order.participant_confirmed(LOYALTY, NOW, points_value=Decimal("10.00"))
    order.shipped(NOW, carrier="dhl", tracking_id="t1", promised_by=NOW + timedelta(days=2))
    order.delivered(NOW)
    drain(order)
    refunds = []
    for i in range(3):
        order.receive_return(
            return_id=f"r{i}",
            location_id="s",
            channel="store",
            lines=returned(("SKU-1", 1)),
            now=NOW,
        )
        refunds.append(drain(order)[1].amount.amount)
    assert refunds == [Decimal("6.66"), Decimal("6.66"), Decimal("6.68")]
    assert sum(refunds) == Decimal("20.00")


def test_refunds_never_exceed_what_was_paid_across_any_sequence_of_returns() -> None:
    rng = random.Random(7)
    for _ in range(300):
        prices = [Decimal(rng.randint(1, 5000)) / 100 for _ in range(rng.randint(1, 4))]
        qtys = [rng.randint(1, 4) for _ in prices]
        gross = sum(p * q for p, q in zip(prices, qtys, strict=True))
        paid = (gross * Decimal(rng.choice([1, 1, 0.9, 0.5, 0.33]))).quantize(Decimal("0.01"))
        remaining, refunded = list(qtys), Decimal(0)
        while any(remaining):
            i = rng.choice([k for k, q in enumerate(remaining) if q])
            n = rng.randint(1, remaining[i])
            remaining[i] -= n
            refund = refund_amount(
                returned_value=prices[i] * n,
                gross=gross,
                paid=paid,
                refunded_before=refunded,
                fully_returned=not any(remaining),
            )
            assert refund >= 0
            refunded += refund
            assert refunded <= paid
        assert refunded == min(paid, gross)
