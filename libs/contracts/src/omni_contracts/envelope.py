"""CloudEvents 1.0 in Kafka binary content mode, exactly as CONTRACT.md fixes it.

The message value is the event's ``data`` as UTF-8 JSON; the envelope travels in headers
(``ce_specversion``, ``ce_id``, ``ce_type``, ``ce_source``, ``ce_time``, ``content-type``,
optional ``ce_subject``) plus the platform's ``correlation_id`` and ``causation_id``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import ValidationError

from omni_contracts.base import NUL_CHECKED, Event

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"

E = TypeVar("E", bound=Event)

HeaderItems = Iterable[tuple[str, bytes | str | None]]


class EnvelopeError(ValueError):
    """The headers are not a valid CloudEvents binary-mode envelope."""


# The RFC 9562 string form: five hyphenated groups of ASCII hex digits. Python's uuid.UUID
# also takes braces, a urn:uuid: prefix, no or misplaced hyphens, signs, underscores and
# non-ASCII digits; PostgreSQL's uuid type refuses some of those and respells others, so the
# id a consumer dedups on would not be the id the inbox holds.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Special values that identify no event: every producer sending one would dedup on it.
_NO_EVENT_IDS = frozenset(
    {"00000000-0000-0000-0000-000000000000", "f" * 8 + "-ffff" * 3 + "-" + "f" * 12}
)


def canonical_ce_id(value: str) -> str:
    """``value`` as the contract's ``ce_id``: a UUID in its hyphenated 8-4-4-4-12 form,
    in lower case (hex digits are case-insensitive on input, RFC 9562), which is how
    PostgreSQL stores and compares it. Raises :class:`EnvelopeError` for any other form.
    """
    lowered = value.lower()
    if not _CANONICAL_UUID.fullmatch(lowered):
        raise EnvelopeError(
            f"ce_id {value!r} is not a UUID in its canonical form"
            " (8-4-4-4-12 hexadecimal digits, e.g. 3f2b8c1e-9d4a-4f6b-8a2e-7c5d1e0f9a3b)"
        )
    if lowered in _NO_EVENT_IDS:
        raise EnvelopeError(f"ce_id {value!r} is the nil or max UUID, which names no event")
    return lowered


class PayloadError(ValueError):
    """The value is not valid JSON or does not match the event type's schema."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """The CloudEvents attributes and platform extras of one Kafka message."""

    id: str
    type: str
    source: str
    time: datetime
    subject: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None

    def headers(self) -> dict[str, str]:
        """The Kafka headers that carry this envelope."""
        headers = {
            "ce_specversion": SPECVERSION,
            "ce_id": self.id,
            "ce_type": self.type,
            "ce_source": self.source,
            "ce_time": self.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "content-type": CONTENT_TYPE,
        }
        if self.subject is not None:
            headers["ce_subject"] = self.subject
        if self.correlation_id is not None:
            headers["correlation_id"] = self.correlation_id
        if self.causation_id is not None:
            headers["causation_id"] = self.causation_id
        return headers


def new_envelope(
    event: Event,
    *,
    source: str,
    caused_by: Envelope | None = None,
    correlation_id: str | None = None,
    ce_id: str | None = None,
    time: datetime | None = None,
) -> Envelope:
    """A fresh envelope for ``event``; ``caused_by`` links it into its customer journey.

    A given ``ce_id`` must be one consumers take (see :func:`canonical_ce_id`).
    """
    event_id = canonical_ce_id(ce_id) if ce_id else str(uuid.uuid4())
    return Envelope(
        id=event_id,
        type=event.ce_type,
        source=source,
        time=time or datetime.now(UTC),
        subject=event.subject(),
        correlation_id=correlation_id
        or (caused_by.correlation_id if caused_by else None)
        or (caused_by.id if caused_by else event_id),
        causation_id=caused_by.id if caused_by else None,
    )


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError as exc:
            raise EnvelopeError("a header is not UTF-8") from exc
    return value


def header_map(headers: HeaderItems | Mapping[str, bytes | str | None]) -> dict[str, str]:
    """Kafka headers (a list of pairs or a mapping, bytes or str) as a str -> str dict."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    result: dict[str, str] = {}
    for key, value in items:
        text = _text(value)
        if text is not None:
            result[key] = text
    return result


def parse_envelope(headers: HeaderItems | Mapping[str, bytes | str | None]) -> Envelope:
    """Read the envelope from Kafka headers, or raise :class:`EnvelopeError` saying why."""
    h = header_map(headers)
    missing = [k for k in ("ce_id", "ce_type", "ce_source") if not h.get(k)]
    if missing:
        raise EnvelopeError(f"missing CloudEvents header(s): {', '.join(missing)}")
    if h.get("ce_specversion", SPECVERSION) != SPECVERSION:
        raise EnvelopeError(f"unsupported ce_specversion {h['ce_specversion']!r}")
    ce_id = canonical_ce_id(h["ce_id"])
    raw_time = h.get("ce_time")
    try:
        time = datetime.fromisoformat(raw_time) if raw_time else datetime.now(UTC)
    except ValueError as exc:
        raise EnvelopeError(f"ce_time {raw_time!r} is not RFC 3339") from exc
    if time.tzinfo is None:
        raise EnvelopeError("ce_time has no timezone")
    return Envelope(
        id=ce_id,
        type=h["ce_type"],
        source=h["ce_source"],
        time=time.astimezone(UTC),
        subject=h.get("ce_subject"),
        correlation_id=h.get("correlation_id"),
        causation_id=h.get("causation_id"),
    )


def encode(event: Event) -> bytes:
    """The Kafka message value of an event: its data as UTF-8 JSON.

    Every field is written, nulls included: a required field may be nullable (an anonymous
    store sale's ``customer_id``), and leaving it out would fail the consumer's validation.
    """
    return event.model_dump_json().encode()


def decode(model: type[E], value: bytes | None) -> E:
    """Validate a Kafka message value against ``model``, or raise :class:`PayloadError`."""
    if not value:
        raise PayloadError("empty message value")
    # Bytes without the escape cannot hold a NUL: the model's walk looking for one is skipped.
    context = NUL_CHECKED if b"\\u0000" not in value else None
    try:
        return model.model_validate_json(value, context=context)
    except ValidationError as exc:
        kind = "malformed JSON" if exc.errors()[0]["type"] == "json_invalid" else "schema"
        raise PayloadError(f"{kind}: {_summarise(exc)}") from exc


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
