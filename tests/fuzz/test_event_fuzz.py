"""Hypothesis-generated malformed events on every topic every installed service consumes.

For each event type a service handles, hypothesis builds messages that can never be valid:
bytes that are not JSON, JSON that is not an object, objects missing a required field, a
NUL character hidden anywhere, numbers beyond what the field (and its column) can hold;
and per topic, envelopes that are broken (no ``ce_id``, an unknown ``ce_type``, a bad
``ce_time``). Each must end in ``<topic>.dlq`` with a ``dlq_reason``, from every service
that consumes the topic, and the consumers must get through all of them (they never stall).
``OMNI_FUZZ_EVENTS`` sets the messages per event type (default 20).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections import Counter
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from omni_common.service import ServiceRuntime, service_factories
from omni_contracts.catalogue import EVENT_TYPES
from omni_devkit.testing.events import ChannelPublisher, ce_headers, record_headers
from omni_devkit.testing.plugin import OmniTestEnv
from omni_devkit.testing.services import running

pytestmark = pytest.mark.integration

PER_TYPE = int(os.environ.get("OMNI_FUZZ_EVENTS", "20"))

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _with_nul(value: Any, draw: st.DrawFn) -> Any:
    """``value`` with a NUL character put into one of its strings (or replacing it)."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: _with_nul(value[key], draw)}
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], _with_nul(value[i], draw), *value[i + 1 :]]
    if isinstance(value, str):
        at = draw(st.integers(0, len(value)))
        return value[:at] + "\x00" + value[at:]
    return "bad\x00value"


def _too_big(prop: dict[str, Any]) -> int | None:
    """A number beyond the field's ``maximum`` (None if the field has no integer bound)."""
    for option in [prop, *prop.get("anyOf", [])]:
        if option.get("type") == "integer" and "maximum" in option:
            return int(option["maximum"]) + 1
    return None


@st.composite
def malformed(draw: st.DrawFn, schema: dict[str, Any]) -> tuple[str, bytes]:
    """(what was broken, a message value) that no service may accept for this schema."""
    required = schema.get("required", [])
    props = schema.get("properties", {})
    base = {name: draw(_json) for name in required}
    base.update(draw(st.dictionaries(st.text(min_size=1, max_size=8), _json, max_size=3)))
    kinds = ["not_json", "not_an_object", "nul"]
    if required:
        kinds.append("missing_field")
    bounded = {n: _too_big(props[n]) for n in required if _too_big(props.get(n, {}))}
    if bounded:
        kinds.append("out_of_range")
    kind = draw(st.sampled_from(kinds))
    if kind == "not_json":
        raw = draw(st.binary(min_size=1, max_size=40))
        return kind, b"\xff" + raw  # never valid JSON (not even UTF-8)
    if kind == "not_an_object":
        return kind, json.dumps(draw(st.lists(_json, max_size=3) | st.integers())).encode()
    if kind == "missing_field":
        gone = draw(st.sampled_from(required))
        return kind, json.dumps({k: v for k, v in base.items() if k != gone}).encode()
    if kind == "out_of_range":
        name = draw(st.sampled_from(sorted(bounded)))
        over = draw(st.integers(bounded[name], 2**63))
        # Every other field stays random: the event is invalid whatever they are.
        return kind, json.dumps({**base, name: over}).encode()
    return kind, json.dumps(_with_nul(base, draw)).encode()


def _examples(schema: dict[str, Any], n: int) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []

    @hypothesis.settings(
        max_examples=n,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(malformed(schema))
    def collect(example: tuple[str, bytes]) -> None:
        found.append(example)

    collect()
    return found[:n]


def _broken_envelopes(topic_types: list[str]) -> list[tuple[str, dict[str, str]]]:
    ce_type = topic_types[0]
    no_id = ce_headers(ce_type)
    del no_id["ce_id"]
    bad_time = {**ce_headers(ce_type), "ce_time": "yesterday"}
    unknown = ce_headers("no.such.event")
    return [("no_ce_id", no_id), ("bad_ce_time", bad_time), ("unknown_type", unknown)]


async def test_malformed_events_end_in_the_dlq_and_never_stall_a_consumer(
    omni_env: OmniTestEnv,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        runtimes: dict[str, ServiceRuntime] = {}
        for name, entry in sorted(service_factories().items()):
            app = entry.load()(omni_env.settings(name))
            runtimes[name] = (await stack.enter_async_context(running(app))).runtime
        consumers: dict[str, dict[str, frozenset[str]]] = {}  # topic -> service -> types
        for name, runtime in runtimes.items():
            for topic, types in runtime.kafka.handled_event_types().items():
                consumers.setdefault(topic, {})[name] = types
        assert consumers, "no service consumes anything"
        channel = await stack.enter_async_context(
            ChannelPublisher(omni_env.bootstrap, omni_env.prefix)
        )

        expected: Counter[tuple[str, str]] = Counter()  # (topic, service) -> DLQ records
        sent: Counter[str] = Counter()  # "topic ce_type" -> messages
        marks: dict[str, tuple[str, str]] = {}  # ce_id -> (topic, what was broken)
        for topic, services in sorted(consumers.items()):
            handled = sorted(set().union(*services.values()))
            for ce_type in handled:
                schema = EVENT_TYPES[ce_type].model_json_schema()
                for kind, value in _examples(schema, PER_TYPE):
                    headers = ce_headers(ce_type)
                    marks[headers["ce_id"]] = (topic, kind)
                    key = f"k-{uuid.uuid4().hex[:6]}"
                    await channel.publish_raw(topic, value, key=key, headers=headers)
                    sent[f"{topic} {ce_type}"] += 1
                    for service, types in services.items():
                        if ce_type in types:
                            expected[(topic, service)] += 1
            for kind, headers in _broken_envelopes(handled):
                if "ce_id" in headers:
                    marks[headers["ce_id"]] = (topic, kind)
                await channel.publish_raw(topic, b"{}", key="k", headers=headers)
                sent[f"{topic} <envelope:{kind}>"] += 1
                # A contract type a service does not want is acknowledged unread by it (the
                # ce_type header comes first); the services that want it dead-letter it. A
                # type outside the contract is every consumer's to dead-letter.
                for service, types in services.items():
                    if kind == "unknown_type" or headers["ce_type"] in types:
                        expected[(topic, service)] += 1

        got: Counter[tuple[str, str]] = Counter()
        reasons: Counter[str] = Counter()
        for topic in consumers:
            reader = await stack.enter_async_context(omni_env.reader(f"{topic}.dlq"))
            want = sum(n for (t, _), n in expected.items() if t == topic)
            records = await reader.collect(want, timeout=60)
            for record in records:
                headers = record_headers(record)
                assert headers.get("dlq_reason"), headers
                assert headers["dlq_source_topic"] == omni_env.topic(topic)
                got[(topic, headers["dlq_service"])] += 1
                reasons[headers["dlq_reason"]] += 1

    print(f"\nfuzzed events: {sum(sent.values())} sent on {len(consumers)} topics")
    for label, n in sorted(sent.items()):
        print(f"  {label}: {n}")
    print(f"  dead-lettered by reason: {dict(reasons)}")
    assert got == expected
