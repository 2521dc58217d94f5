"""Producer options: durable by default, and no idempotence where the broker cannot be asked."""

from __future__ import annotations

import socket

from omni_common.producer import (
    PRODUCER_MAX_REQUEST_SIZE,
    ProducerOptions,
    idempotence_supported,
    producer_options,
)
from omni_common.topics import MAX_MESSAGE_BYTES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_producer_accepts_nothing_the_topics_refuse() -> None:
    assert PRODUCER_MAX_REQUEST_SIZE < MAX_MESSAGE_BYTES
    options = ProducerOptions("all", True, PRODUCER_MAX_REQUEST_SIZE, "test")
    assert options.as_kwargs() == {
        "acks": "all",
        "enable_idempotence": True,
        "max_request_size": PRODUCER_MAX_REQUEST_SIZE,
    }


async def test_an_unreachable_broker_means_no_idempotence_and_says_why() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    supported, why = await idempotence_supported(bootstrap, timeout_s=0.5)
    assert not supported
    assert "could not ask the broker" in why
    options = await producer_options(bootstrap, timeout_s=0.5)
    assert (options.acks, options.enable_idempotence) == ("all", False)
