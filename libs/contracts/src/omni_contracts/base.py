"""Building blocks of the public contract (see shared CONTRACT.md).

Every event type is a pydantic model deriving from :class:`Event`. Its class variables say
which topic it travels on, its CloudEvents ``ce_type`` and which field is the Kafka key.
The model is the event's ``data`` (the Kafka message value); the envelope travels in headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a timezone (RFC 3339, UTC)")
    return value.astimezone(UTC)


UtcDatetime = Annotated[
    datetime,
    AfterValidator(_utc),
    PlainSerializer(lambda v: v.isoformat().replace("+00:00", "Z"), return_type=str),
    # Keep the format in the published schema (the serializer alone would say just "string").
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""An RFC 3339 timestamp, normalised to UTC."""

INT4_MAX = 2**31 - 1
"""The largest integer a PostgreSQL ``integer`` column holds: the bound of counts and points."""

MAX_LINES = 100
"""Lines per sale, cart, checkout, order or return."""

MAX_TEXT = 4000
"""The longest free text any contract string may be (identifiers: 200)."""

NO_NUL = r"^[^\x00]*$"

MAX_IDENTIFIER = 200
"""The longest identifier (or short reason) a contract string may be."""

NonEmptyStr = Annotated[str, Field(min_length=1, max_length=MAX_IDENTIFIER, pattern=NO_NUL)]
"""An opaque identifier (sku, location_id, customer_id, ...)."""

Quantity = Annotated[int, Field(ge=0, le=INT4_MAX)]
"""A non-negative whole number of units."""

PositiveQuantity = Annotated[int, Field(gt=0, le=INT4_MAX)]
"""A whole number of units, at least one."""

SignedCount = Annotated[int, Field(ge=-INT4_MAX, le=INT4_MAX)]
"""A signed whole number (points, deltas) that an ``integer`` column holds."""

Text = Annotated[str, Field(max_length=MAX_TEXT, pattern=NO_NUL)]
"""Free text (a reason, a description): bounded, never a NUL character."""

DecimalAmount = Annotated[
    Decimal,
    Field(max_digits=14, decimal_places=2, ge=0),
    # Always two places ("19.90", never "19.9" or "1.99E+1"), as CONTRACT.md shows money.
    PlainSerializer(lambda v: format(v.quantize(Decimal("0.01")), "f"), return_type=str),
    # Publish the wire form: a decimal string, never a JSON number.
    WithJsonSchema({"type": "string", "pattern": r"^\d{1,12}(\.\d{1,2})?$", "examples": ["19.90"]}),
]
"""A money amount as a decimal string, never a float."""


def utcnow() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


class Channel(StrEnum):
    """Where the shopper met the retailer."""

    WEB = "web"
    APP = "app"
    STORE = "store"
    CALL_CENTER = "call_center"


NUL_CHECKED: dict[str, bool] = {"nul_checked": True}
"""Validation context saying the input holds no NUL character: JSON can only carry one as
the escape ``\\u0000`` (the parser refuses a raw one), so looking at the bytes suffices."""


def _find_nul(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if depth > 32:
        return False  # pydantic refuses what is nested this deep anyway
    if isinstance(value, dict):
        return any(_find_nul(k, depth + 1) or _find_nul(v, depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_find_nul(v, depth + 1) for v in value)
    return False


class BoundedModel(BaseModel):
    """A model whose text PostgreSQL can always store: no NUL character anywhere (unknown
    fields included), no string longer than :data:`MAX_TEXT`. Request bodies derive from it
    too."""

    model_config = ConfigDict(str_max_length=MAX_TEXT)

    @model_validator(mode="before")
    @classmethod
    def _refuse_nul(cls, data: Any, info: ValidationInfo) -> Any:
        # PostgreSQL text and jsonb cannot hold U+0000: refuse it at the border. A JSON
        # document whose bytes were found free of it (see NUL_CHECKED) is not walked again.
        if info.context is not NUL_CHECKED and _find_nul(data):
            raise ValueError("text must not contain NUL (U+0000) characters")
        return data


class ContractModel(BoundedModel):
    """Base of every contract model: unknown fields are kept (adding fields is allowed)."""

    model_config = ConfigDict(
        extra="allow", frozen=True, str_strip_whitespace=True, str_max_length=MAX_TEXT
    )


class Money(ContractModel):
    """An amount of money: a decimal string with its ISO 4217 currency."""

    amount: DecimalAmount
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]


class Event(ContractModel):
    """Base of every event: the CloudEvents ``data`` of one ``ce_type``."""

    topic: ClassVar[str]
    ce_type: ClassVar[str]
    key_field: ClassVar[str]

    def partition_key(self) -> str:
        """The Kafka key of this event (the topic's key field)."""
        return str(getattr(self, self.key_field))

    def subject(self) -> str | None:
        """The CloudEvents ``ce_subject``: the entity the event is about."""
        return self.partition_key()


@dataclass(frozen=True)
class TopicSpec:
    """A public topic: its name, key, partition count and event types."""

    name: str
    key: str
    partitions: int
    description: str
    direction: str  # "inbound" (channels produce) or "outbound" (the platform produces)
    compacted: bool = False
    retention_ms: int = 7 * 24 * 3600 * 1000
    events: dict[str, type[Event]] = field(default_factory=dict)

    @property
    def dlq(self) -> str:
        """The dead-letter topic of this topic."""
        return f"{self.name}.dlq"


def event_schema(model: type[Event]) -> dict[str, Any]:
    """The JSON schema of an event's data, for the AsyncAPI document."""
    return model.model_json_schema(mode="serialization")
