"""The one shape of every event handler and timer handler; the runtime owns the rest.

A handler is an async function. Its first parameter receives the events of its types that
arrived together (a :data:`Lot`), in their order; every other parameter is injected by
name, once, when the service is composed:

- ``tx``: the :class:`~omni_common.service.Tx` the runtime opened (connection, outbox,
  ``after_commit``);
- ``clock``: the service's clock (``() -> datetime``, UTC);
- any name the composition root provided with ``ServiceRuntime.provide(name=value)``.

::

    async def record_sales(sales: Lot[SaleRecorded], tx: Tx, inventory: Inventory) -> None:
        for sale, envelope in sales:
            ...

    Subscription(STORE_SALES, {SaleRecorded: record_sales})

The runtime opens the transaction, records every event in the inbox (a redelivered event
never reaches a handler twice), dead-letters a :class:`Refusal` with its reason, retries
what failed for the world's reasons, and counts what committed. A timer handler has the
same shape, with the due timers (:class:`Due`) as its first parameter.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

from omni_contracts.base import Event
from omni_contracts.envelope import Envelope

E = TypeVar("E")


class Received(NamedTuple, Generic[E]):
    """One event as it was received: the validated event and its envelope."""

    event: E
    envelope: Envelope


Lot = Sequence[Received[E]]
"""The events of one handler's types that arrived together, in their order (per key)."""


class Due(NamedTuple):
    """A durable timer that came due: its key, what was stored with it, and when."""

    key: str
    payload: dict[str, Any]
    due_at: datetime


class Refusal(Exception):
    """A valid event (or request) that the domain refuses: unknown SKU, illegal change, ...

    An event refused is dead-lettered at once with ``reason`` (retrying cannot help); HTTP
    answers it with a client error. Domain errors subclass it.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


Handler = Callable[..., Awaitable[None]]
"""``async def handle(lot, tx, <dependencies>...) -> None`` (see the module's docstring)."""

BoundHandler = Callable[[Any, Any], Awaitable[None]]
"""A handler with its dependencies bound: ``(lot, tx)``."""

Clock = Callable[[], datetime]
"""The service's clock: the current time in UTC."""


@dataclass(frozen=True, slots=True)
class Handle:
    """A handler and the filter that decides, before any transaction, which events reach it."""

    handler: Handler
    relevant: Callable[[Any], bool] | None = None


def only_when(relevant: Callable[[Any], bool], handler: Handler) -> Handle:
    """``handler`` for the events ``relevant`` accepts; the others are acknowledged untouched.

    For events that change nothing in this service (an anonymous store sale, an order born
    completed): no transaction and no inbox record, which a redelivery cannot change either.
    ``relevant`` sees the decoded event and runs before any transaction opens.
    """
    return Handle(handler, relevant)


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a service consumes from one topic: a handler per event type.

    ``together``: the events waiting on the topic's partitions are handled in one
    transaction (a lot). Say False, or per event a predicate, for events whose handler locks
    shared rows in an order ``prepare`` cannot take first: two lots could lock them in
    opposite orders and deadlock. An event the predicate refuses is handled alone, in order.

    ``prepare`` has a handler's shape and runs first in a lot's transaction, with all of its
    events: take there, in one sorted sweep, every lock the handlers will take, so lots of
    different partitions cannot deadlock.
    """

    topic: str
    handlers: Mapping[type[Event], Handler | Handle]
    together: bool | Callable[[Event], bool] = True
    prepare: Handler | None = None


def bind(handler: Handler, provided: Mapping[str, Any]) -> BoundHandler:
    """``handler`` with every parameter after the first bound by name, ``tx`` left free.

    Raises ``TypeError`` at composition time for a parameter nobody provides, so a wiring
    mistake stops the service before it consumes anything.
    """
    parameters = list(inspect.signature(handler).parameters.values())
    if not parameters:
        raise TypeError(f"{_name(handler)} takes no lot: its first parameter receives the events")
    bound: dict[str, Any] = {}
    wants_tx = False
    for parameter in parameters[1:]:
        if parameter.name == "tx":
            wants_tx = True
        elif parameter.name in provided:
            bound[parameter.name] = provided[parameter.name]
        elif parameter.default is inspect.Parameter.empty:
            known = ", ".join(sorted(["tx", *provided])) or "tx"
            raise TypeError(
                f"{_name(handler)} asks for {parameter.name!r}, which the service does not"
                f" provide (provided: {known})"
            )

    if wants_tx:

        async def with_tx(lot: Any, tx: Any) -> None:
            await handler(lot, tx=tx, **bound)

        call: BoundHandler = with_tx
    else:

        async def without_tx(lot: Any, tx: Any) -> None:
            await handler(lot, **bound)

        call = without_tx
    call.__name__ = _name(handler)
    call.__doc__ = handler.__doc__
    return call


def _name(handler: Callable[..., Any]) -> str:
    module = getattr(handler, "__module__", "") or ""
    return f"{module.rsplit('.', 1)[-1]}.{getattr(handler, '__qualname__', repr(handler))}"
