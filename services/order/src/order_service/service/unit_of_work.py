"""One unit of work: a transaction in which orders change and their events go to the outbox.

Whatever starts the change (an event, an HTTP request, a timer) goes through here, so the
state, the inbox record, the history and the outbound events commit together, and the
business metrics count only what committed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
from omni_common.service import ServiceRuntime, Tx
from omni_contracts import OrderStatus
from omni_contracts.envelope import Envelope

from order_service.adapters.metrics import OrderMetrics
from order_service.adapters.repository import OrderRepository
from order_service.domain.errors import IllegalTransition, OrderNotFound
from order_service.domain.model import Order

log = logging.getLogger(__name__)


@dataclass
class UnitOfWork:
    """The transaction of one change: repository, outbox, and what to count once committed."""

    tx: Tx
    envelope: Envelope | None
    repo: OrderRepository = field(init=False)
    committed: list[tuple[list[OrderStatus], str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.repo = OrderRepository(self.tx.conn)

    @property
    def conn(self) -> asyncpg.Connection:
        """The transaction's connection (the timer wheel deletes fired timers on it)."""
        return self.tx.conn

    async def load(self, order_id: str) -> Order:
        """The order, locked until commit; :class:`OrderNotFound` if there is none."""
        order = await self.repo.get(order_id)
        if order is None:
            raise OrderNotFound(f"no order {order_id}")
        return order

    async def commit(self, order: Order, *, new: bool = False) -> None:
        """Persist the order's changes and write its events to the outbox (same transaction).

        Events are caused by the incoming event (if any) and carry the order's journey as
        ``correlation_id``, whether the change came from Kafka, HTTP or a timer.
        """
        if new:
            await self.repo.add(order)
        else:
            await self.repo.save(order)
        for event in order.events:
            await self.tx.emit(event, caused_by=self.envelope, correlation_id=order.correlation_id)
        self.committed.append((list(order.transitions), order.channel.value))
        order.events.clear()
        order.transitions.clear()
        order.new_returns.clear()
        order.notes.clear()


@contextlib.asynccontextmanager
async def unit_of_work(
    runtime: ServiceRuntime,
    metrics: OrderMetrics,
    *,
    envelope: Envelope | None = None,
    consumer: str | None = None,
) -> AsyncIterator[UnitOfWork | None]:
    """A unit of work; for an event (``envelope`` + ``consumer``) it yields None when the
    event was handled before (inbox dedup). Illegal transitions are counted as refused."""
    transaction = (
        runtime.handling(consumer, envelope)
        if envelope is not None and consumer is not None
        else runtime.transaction()
    )
    in_lot = False
    try:
        async with transaction as tx:
            if tx is None:
                yield None
                return
            in_lot = tx.in_lot
            uow = UnitOfWork(tx, envelope)
            yield uow

            def count() -> None:
                # Committed: now it is true that these transitions happened.
                for statuses, channel in uow.committed:
                    metrics.transitioned(statuses, channel)

            tx.after_commit(count)
    except IllegalTransition:
        if not in_lot:  # a refused event rolls its lot back and comes again alone
            metrics.refused()
        raise


# -- workaround: keep customer_id null on the wire --------------------------------------------
# The foundation's encode() drops None fields (exclude_none=True), but OrderEvent.customer_id
# is required-nullable ("always present, null for an anonymous in-store sale"), so an
# anonymous sale's events would fail every consumer's validation. Until encode() is fixed, such
# events are sent as a subclass whose JSON keeps "customer_id": null.
