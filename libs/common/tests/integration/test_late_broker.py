"""A broker that answers late at start-up still gets an idempotent producer.

The producer's durability is asked of the broker before the service connects. On the old
code a broker that had not answered within ten seconds was taken for one without producer
ids, and the service ran without idempotence for the rest of its life.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from omni_common.service import ServiceRuntime
from omni_devkit.devstack.process import free_port
from omni_devkit.testing.plugin import broker_kind

pytestmark = pytest.mark.integration

LATE_S = 11.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def late_proxy(target: str, after_s: float):
    """A bootstrap address that refuses connections for ``after_s``, then forwards to
    ``target`` (clients then talk to the broker it advertises, as with a real broker)."""
    host, port = target.rsplit(":", 1)
    listen = free_port()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    async def open_later() -> asyncio.Server:
        await asyncio.sleep(after_s)
        return await asyncio.start_server(forward, "127.0.0.1", listen)

    opening = asyncio.create_task(open_later())
    try:
        yield f"127.0.0.1:{listen}"
    finally:
        server = await opening
        server.close()


async def test_a_broker_that_answers_late_still_gets_an_idempotent_producer(omni_env) -> None:
    if broker_kind() != "kafka":
        pytest.skip("Tansu hands out no producer ids: nothing to be late for")
    async with late_proxy(omni_env.bootstrap, LATE_S) as bootstrap:
        runtime = ServiceRuntime(omni_env.settings("late", kafka_bootstrap_servers=bootstrap))
        try:
            await runtime.kafka.connect()
            options = runtime.kafka.producer_options
            assert options is not None
            assert options.enable_idempotence, options.reason
        finally:
            await runtime.kafka.stop()
