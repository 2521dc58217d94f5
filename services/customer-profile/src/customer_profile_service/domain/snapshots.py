"""A profile snapshot never exceeds what the topic takes (pure, no I/O).

``customer.profile.v1`` is compacted: a snapshot the broker refuses would be parked, and
every later consent change behind it would never reach notification. Devices and
identifiers are bounded where they are kept; this is the last guard, which drops the
oldest entries of the lists that can grow until the encoded snapshot fits.
"""

from __future__ import annotations

import json
from typing import Any

from omni_common.topics import MAX_MESSAGE_BYTES

SNAPSHOT_BUDGET_BYTES = MAX_MESSAGE_BYTES // 2
"""The most a snapshot's value may take: half the topic's limit leaves room for headers
and the record batch, whatever the producer adds."""

# Dropped first to last, oldest first within each: what a shopper misses least.
_SHEDDABLE = (
    "anonymous_ids",
    "push_tokens",
    "push_subscriptions",
    "loyalty_cards",
    "phones",
    "emails",
)


def encoded_size(fields: dict[str, Any]) -> int:
    """The bytes of ``fields`` as a JSON message value."""
    return len(json.dumps(fields, separators=(",", ":"), default=str).encode())


def bound_snapshot(fields: dict[str, Any], budget: int = SNAPSHOT_BUDGET_BYTES) -> dict[str, Any]:
    """``fields`` with the oldest list entries dropped until it encodes within ``budget``.

    The primary e-mail, phone and card (single fields) are never dropped.
    """
    size = encoded_size(fields)
    if size <= budget:
        return fields
    out = {k: (list(v) if k in _SHEDDABLE else v) for k, v in fields.items()}
    for name in _SHEDDABLE:
        items = out.get(name) or []
        while items and size > budget:
            gone = items.pop(0)
            size -= encoded_size({"x": gone}) - 6  # the item and its comma, roughly
        if size <= budget:
            break
    # Rough accounting above: measure once more and shed whatever is left if still over.
    while encoded_size(out) > budget and any(out.get(n) for n in _SHEDDABLE):
        for name in _SHEDDABLE:
            if out.get(name):
                out[name].pop(0)
                break
    return out
