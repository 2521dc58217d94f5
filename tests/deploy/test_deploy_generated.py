"""The generated manifests equal what the code says: topics, ACLs, autoscaling.

``deploy/k8s/generate.py`` renders them from ``omni_contracts.catalogue.TOPICS`` and
``omni_common.service.describe_service``; these tests re-render in memory and compare.
"""

from __future__ import annotations

from typing import Any

import pytest
from deploy_manifests import (
    OVERLAYS,
    REPO_ROOT,
    acl_sets,
    assert_valid,
    by_kind,
    load_generator,
    render_overlay,
)

try:
    from omni_common.service import describe_service, service_names
    from omni_common.topics import DLQ_MAX_PARTITIONS, DLQ_RETENTION_MS
    from omni_contracts.catalogue import TOPICS
except ImportError as exc:  # pragma: no cover - only while the lead's code is missing
    pytest.skip(
        f"omni_common does not provide TOPICS/describe_service yet ({exc})",
        allow_module_level=True,
    )

gen = load_generator()


@pytest.fixture(scope="module")
def rendered() -> dict[Any, str]:
    """Every generated file, rendered in memory from the code."""
    return gen.render_all()


def test_committed_files_equal_the_rendering(rendered: dict[Any, str]) -> None:
    """The committed generated files cannot drift from the code."""
    stale = gen.stale_files(rendered, REPO_ROOT)
    assert not stale, (
        f"generated files are stale: {[str(p) for p in stale]}; "
        "run `uv run python deploy/k8s/generate.py`"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_contract_topic_and_its_dlq_has_a_kafka_topic(overlay: str) -> None:
    """Partitions, retention and compaction as the catalogue says; a .dlq for each topic."""
    topics = {
        t["spec"]["topicName"]: t for t in by_kind(render_overlay(overlay), "KafkaTopic").values()
    }
    expected = set(TOPICS) | {spec.dlq for spec in TOPICS.values()}
    assert set(topics) == expected
    for name, spec in TOPICS.items():
        topic = topics[name]["spec"]
        assert topic["partitions"] == spec.partitions, name
        policy = topic["config"]["cleanup.policy"]
        if spec.compacted:
            assert policy == "compact", name
        else:
            assert policy == "delete", name
            assert topic["config"]["retention.ms"] == spec.retention_ms, name
        # Dead-letter topics as `omni topics create` makes them (docker-compose, dev stack).
        dlq = topics[spec.dlq]["spec"]
        assert dlq["config"] == {"cleanup.policy": "delete", "retention.ms": DLQ_RETENTION_MS}
        assert dlq["partitions"] == max(1, min(spec.partitions, DLQ_MAX_PARTITIONS))
    assert topics["customer.profile.v1"]["spec"]["config"]["cleanup.policy"] == "compact"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_user_acls_equal_what_the_code_declares(overlay: str) -> None:
    """Each service reads exactly what it consumes (or tails), writes exactly what it
    produces."""
    users = by_kind(render_overlay(overlay), "KafkaUser")
    assert set(users) == set(service_names())
    for name in service_names():
        desc = describe_service(name)
        read, written, groups = acl_sets(users[name])
        assert read == set(desc.consumes | desc.reads), name
        assert written == set(desc.produces), name
        assert groups == ({desc.group_id} if desc.consumes else set()), name
        assert users[name]["spec"]["authentication"]["type"] == "scram-sha-512"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_on_lag_is_capped_at_the_partition_count(overlay: str) -> None:
    """A consuming service scales on the lag of each topic it reads, up to its partitions."""
    objects = render_overlay(overlay)
    scaled = by_kind(objects, "ScaledObject")
    for name in service_names():
        desc = describe_service(name)
        if not desc.consumes:
            assert name not in scaled
            continue
        spec = scaled[name]["spec"]
        assert spec["maxReplicaCount"] == max(TOPICS[t].partitions for t in desc.consumes)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        triggers = {t["metadata"]["topic"]: t for t in spec["triggers"]}
        assert set(triggers) == set(desc.consumes)
        for trigger in triggers.values():
            assert trigger["type"] == "kafka"
            assert trigger["metadata"]["consumerGroup"] == desc.group_id
            assert int(trigger["metadata"]["lagThreshold"]) > 0


# -- the generator on services that consume and produce (the real ones may not yet) -------------


def _fake_services() -> list[Any]:
    names = list(TOPICS)
    return [
        gen.Service(
            name="inventory",
            consumes=frozenset(names[:3]),
            produces=frozenset([names[-1], *(f"{t}.dlq" for t in names[:3])]),
            group_id="inventory.main",
        ),
        gen.Service(
            name="loyalty",
            consumes=frozenset(),
            produces=frozenset([names[-2]]),
            group_id="loyalty.main",
        ),
    ]


def test_generator_renders_valid_scaling_and_acls_for_consumers() -> None:
    """With real subscriptions: ScaledObject + TriggerAuthentication validate, ACLs exact."""
    import yaml

    services = _fake_services()
    files = gen.render_all(services=services)
    docs = [
        doc
        for content in files.values()
        for doc in yaml.safe_load_all(content)
        if doc and "kind" in doc and doc["kind"] != "Kustomization"
    ]
    for doc in docs:
        doc.setdefault("metadata", {}).setdefault("namespace", "omni")
        assert_valid(doc)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("ScaledObject", "inventory") in kinds
    assert ("TriggerAuthentication", "inventory-kafka") in kinds
    assert ("ScaledObject", "loyalty") not in kinds
    users = {d["metadata"]["name"]: d for d in docs if d["kind"] == "KafkaUser"}
    for service in services:
        read, written, groups = acl_sets(users[service.name])
        assert (read, written) == (set(service.consumes), set(service.produces))
        assert groups == ({service.group_id} if service.consumes else set())
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaled["spec"]["maxReplicaCount"] == max(
        TOPICS[t].partitions for t in services[0].consumes
    )


def test_generator_refuses_topics_missing_from_the_catalogue() -> None:
    """A subscription to a topic the catalogue does not know is a bug, not a manifest."""
    bogus = gen.Service(
        name="x", consumes=frozenset({"nope.v1"}), produces=frozenset(), group_id="x.main"
    )
    with pytest.raises(ValueError, match=r"nope\.v1"):
        gen.render_all(services=[bogus])
