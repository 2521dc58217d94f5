"""Publishing events as a channel team would: CloudEvents binary mode over plain aiokafka."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from aiokafka import AIOKafkaProducer
from omni_contracts.base import Event
from omni_contracts.envelope import Envelope, encode, header_map, new_envelope


class ChannelPublisher:
    """Publishes contract events (or deliberately broken messages) to prefixed topics."""

    def __init__(self, bootstrap: str, prefix: str = "", source: str = "/channels/test") -> None:
        self.prefix = prefix
        self.source = source
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)

    async def __aenter__(self) -> ChannelPublisher:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def publish(
        self,
        event: Event,
        *,
        ce_id: str | None = None,
        envelope: Envelope | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Publish ``event`` on its contract topic, keyed as the contract says."""
        envelope = envelope or new_envelope(event, source=self.source, ce_id=ce_id)
        headers = envelope.headers() | dict(extra_headers or {})
        await self.publish_raw(
            event.topic, encode(event), key=event.partition_key(), headers=headers
        )
        return envelope

    async def publish_raw(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None,
        headers: Mapping[str, str],
    ) -> None:
        """Publish any bytes with any headers (for malformed-input tests)."""
        await self._producer.send_and_wait(
            self.prefix + topic,
            value,
            key=key.encode() if key is not None else None,
            headers=[(k, v.encode()) for k, v in headers.items()],
        )


def ce_headers(
    ce_type: str, *, ce_id: str | None = None, source: str = "/channels/test"
) -> dict[str, str]:
    """Valid CloudEvents headers for a hand-made (possibly invalid) payload."""
    return {
        "ce_specversion": "1.0",
        "ce_id": ce_id or str(uuid.uuid4()),
        "ce_type": ce_type,
        "ce_source": source,
        "ce_time": "2026-11-23T10:00:00Z",
        "content-type": "application/json",
    }


def record_headers(record: object) -> dict[str, str]:
    """The headers of a consumed record as a str dict."""
    return header_map(getattr(record, "headers", None) or ())
