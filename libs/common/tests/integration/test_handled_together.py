"""Events waiting on one partition are handled in one transaction, and a failure among them
stays with its own event: the lot rolls back and is handled one by one."""

from __future__ import annotations

import pytest
from omni_common.handlers import Refusal
from omni_common.service import ServiceRuntime
from omni_contracts import StockAdjusted
from omni_devkit.testing.chaos import EffectCounter, adjustment, wait_for
from omni_devkit.testing.events import ChannelPublisher, record_headers

pytestmark = pytest.mark.integration

TOPIC = EffectCounter.TOPIC


def _sum(runtime: ServiceRuntime, name: str) -> float:
    """A metric's value summed over its labels."""
    return sum(
        sample.value
        for metric in runtime.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == name
    )


async def test_waiting_events_are_handled_together_and_a_refused_one_alone(omni_env) -> None:
    # One SKU, one partition: all wait for the consumer, which starts after they are sent.
    events = [adjustment("SKU-TOGETHER") for _ in range(150)]
    refused = events[17].adjustment_id

    async def refuse_one(event: StockAdjusted, _attempt: int) -> None:
        if event.adjustment_id == refused:
            raise Refusal("refused_for_the_test", event.adjustment_id)

    dlq = omni_env.reader(f"{TOPIC}.dlq")
    async with dlq, ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
        for event in events:
            await channel.publish(event)
        service = await EffectCounter(
            ServiceRuntime(omni_env.settings("together")), fault=refuse_one
        ).start()
        try:

            async def all_but_one_applied() -> bool:
                return (await service.effects())[0] >= len(events) - 1

            await wait_for(all_but_one_applied, timeout=60)
            applied, duplicates = await service.effects()
            dead = await dlq.collect(2, timeout=3)
            rt = service.runtime
            assert applied == len(events) - 1
            assert duplicates == 0
            assert [record_headers(r)["dlq_reason"] for r in dead] == ["refused_for_the_test"]
            # Handled together (several per transaction), and the lot holding the refused one
            # was split; its effect row rolled back with it.
            assert _sum(rt, "omni_consumer_batch_size_count") >= 1
            assert _sum(rt, "omni_consumer_batch_size_sum") > _sum(
                rt, "omni_consumer_batch_size_count"
            )
            assert _sum(rt, "omni_consumer_batches_split_total") >= 1
            rows = await rt.pool.fetchval(
                "SELECT count(*) FROM effects WHERE adjustment_id = $1", refused
            )
            assert rows == 0
        finally:
            await service.runtime.stop()


async def test_a_redelivered_lot_has_no_second_effect(omni_env) -> None:
    # Handled together, the lot's inbox records are written at its end: events handled
    # before (a replay, a redelivery after a crash) roll the lot back, and one by one each
    # is recognised as a duplicate before its effect.
    events = [adjustment("SKU-REDELIVERED") for _ in range(40)]
    async with ChannelPublisher(omni_env.bootstrap, omni_env.prefix) as channel:
        envelopes = [await channel.publish(event) for event in events[:20]]
        service = await EffectCounter(ServiceRuntime(omni_env.settings("redelivered"))).start()
        try:

            async def first_half_applied() -> bool:
                return (await service.effects())[0] >= 20

            await wait_for(first_half_applied, timeout=60)
            rt = service.runtime
            # Stop consuming so that the redeliveries and the new events wait together.
            await rt.stop()
            for event, envelope in zip(events[:20], envelopes, strict=True):
                await channel.publish(event, envelope=envelope)
            for event in events[20:]:
                await channel.publish(event)
            service = await EffectCounter(ServiceRuntime(omni_env.settings("redelivered"))).start()

            async def all_applied() -> bool:
                return (await service.effects())[0] >= len(events)

            await wait_for(all_applied, timeout=60)
            applied, duplicates = await service.effects()
            assert (applied, duplicates) == (len(events), 0)
            assert service.calls  # the second instance saw the lot
            assert _sum(service.runtime, "omni_consumer_batches_split_total") >= 1
        finally:
            await service.runtime.stop()
