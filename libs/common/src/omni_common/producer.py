"""How the services' Kafka producer is configured: durable where the broker allows it.

Every event leaves a service through one producer (the outbox relay and the DLQ path
share it), so its settings decide whether an acknowledged event can still be lost or
doubled by the broker:

- ``acks=all``: a send is acknowledged once every in-sync replica has it;
- idempotence (a producer id and per-partition sequence numbers): a send retried after a
  lost acknowledgement is written once, in order. Apache Kafka supports it; Tansu answers
  ``InitProducerId`` with an error, so there the producer runs without it (said once in
  the log) and the inbox absorbs what a retry doubles;
- ``max_request_size`` matches the topics' ``max.message.bytes``, so what the producer
  accepts the broker accepts too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.transaction import InitProducerIdRequest

from omni_common.topics import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# Room for the record batch's own framing: the broker checks the whole batch against
# max.message.bytes, the producer checks one record against max_request_size.
BATCH_OVERHEAD_BYTES = 1024
PRODUCER_MAX_REQUEST_SIZE = MAX_MESSAGE_BYTES - BATCH_OVERHEAD_BYTES
# RequestTimedOut, CoordinatorLoadInProgress, CoordinatorNotAvailable, NotCoordinator,
# ConcurrentTransactions: a real coordinator that is not ready yet.
_RETRIABLE_COORDINATOR_ERRORS = frozenset({7, 14, 15, 16, 51})


@dataclass(frozen=True, slots=True)
class ProducerOptions:
    """The producer settings chosen for one broker."""

    acks: str
    enable_idempotence: bool
    max_request_size: int
    reason: str

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaProducer`` (and FastStream's ``KafkaBroker``)."""
        return {
            "acks": self.acks,
            "enable_idempotence": self.enable_idempotence,
            "max_request_size": self.max_request_size,
        }


async def ask_idempotence(
    bootstrap: str, timeout_s: float = 10.0, **client_kwargs: Any
) -> tuple[bool | None, str]:
    """Whether the broker hands out producer ids (``InitProducerId``), and why (not).

    ``client_kwargs`` are the connection's security options (``security_protocol``,
    ``ssl_context``, ``sasl_*``). Asks again while the broker cannot be reached or its
    coordinator is still loading, up to ``timeout_s``; None when no answer came by then.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    why = "no answer"
    while True:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, **client_kwargs)
        try:
            remaining = max(0.5, deadline - loop.time())
            await asyncio.wait_for(client.bootstrap(), remaining)
            brokers = list(client.cluster.brokers())
            if brokers:
                request = InitProducerIdRequest(
                    transactional_id=None, transaction_timeout_ms=60_000
                )
                remaining = max(0.5, deadline - loop.time())
                sent = client.send(brokers[0].nodeId, request)
                response = await asyncio.wait_for(sent, remaining)
                if response.error_code == 0 and response.producer_id >= 0:
                    return True, "InitProducerId answered a producer id"
                if response.error_code not in _RETRIABLE_COORDINATOR_ERRORS:
                    return False, f"InitProducerId answered error {response.error_code}"
                # A fresh Kafka creates and loads __transaction_state on the first request.
                why = f"coordinator not ready (error {response.error_code})"
            else:
                why = "no broker in the metadata"
        except Exception as exc:  # not reachable yet
            why = f"could not ask the broker ({type(exc).__name__})"
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if loop.time() >= deadline:
            return None, f"{why} within {timeout_s:g}s"
        await asyncio.sleep(0.2)


async def idempotence_supported(
    bootstrap: str, timeout_s: float = 10.0, **client_kwargs: Any
) -> tuple[bool, str]:
    """Whether the broker hands out producer ids within ``timeout_s`` (no answer: False).

    For tools that must decide now (which broker a test runs on); a service asks until the
    broker answers (:func:`producer_options`).
    """
    supported, why = await ask_idempotence(bootstrap, timeout_s, **client_kwargs)
    return bool(supported), why


async def producer_options(
    bootstrap: str, timeout_s: float | None = None, **client_kwargs: Any
) -> ProducerOptions:
    """``acks=all``, idempotence where the broker supports it, and the size limit.

    Asks until the broker gives an answer (``timeout_s`` None), so a broker that is late at
    start-up still gets an idempotent producer: no answer is not a "no". With ``timeout_s``,
    no answer by then means no idempotence (the inbox absorbs what a retry doubles).
    """
    while True:
        supported, why = await ask_idempotence(bootstrap, timeout_s or 10.0, **client_kwargs)
        if supported is not None or timeout_s is not None:
            break
        log.warning("producer: waiting for the broker at %s to answer (%s)", bootstrap, why)
    if supported:
        log.info("producer: acks=all, idempotent (%s)", why)
    else:
        log.warning(
            "producer: the broker at %s does not support idempotent producers (%s); "
            "acks=all without idempotence, the inbox absorbs retried duplicates",
            bootstrap,
            why,
        )
    return ProducerOptions("all", bool(supported), PRODUCER_MAX_REQUEST_SIZE, why)
