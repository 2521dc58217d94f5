"""Every kustomize overlay renders, every object validates, and the manifests keep their rules."""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import pytest
from deploy_manifests import (
    OVERLAYS,
    ManifestError,
    assert_valid,
    by_kind,
    object_id,
    render_overlay,
    validation_errors,
)

SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEYS|DATABASE_URL|CREDENTIAL", re.I)


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _service_deployments(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in by_kind(objects, "Deployment").items()
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "service"
    }


# -- rendering and schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    """kubectl kustomize renders the overlay; core kinds and CRs validate (strictly)."""
    objects = render_overlay(overlay)
    assert objects, f"{overlay} rendered nothing"
    problems = {object_id(obj): validation_errors(obj) for obj in objects}
    problems = {key: errors for key, errors in problems.items() if errors}
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())


def test_an_object_of_unknown_kind_fails() -> None:
    """A kind with no schema (neither core nor a shared CRD) is an error, not a pass."""
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(ManifestError, match="no schema"):
        assert_valid(widget)
    # A known group with an unknown version is unknown too.
    topic = {
        "apiVersion": "kafka.strimzi.io/v1alpha9",
        "kind": "KafkaTopic",
        "metadata": {"name": "t"},
        "spec": {},
    }
    with pytest.raises(ManifestError, match="no schema"):
        assert_valid(topic)


def test_unknown_fields_and_wrong_types_fail() -> None:
    """The validation is strict for custom resources and core kinds alike."""
    objects = render_overlay("dev")
    topic = copy.deepcopy(next(o for o in objects if o["kind"] == "KafkaTopic"))
    assert_valid(topic)
    topic["spec"]["partitionz"] = 3
    with pytest.raises(ManifestError, match="partitionz"):
        assert_valid(topic)

    deployment = copy.deepcopy(next(iter(by_kind(objects, "Deployment").values())))
    assert_valid(deployment)
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "soon"
    with pytest.raises(ManifestError):
        assert_valid(deployment)
    deployment = copy.deepcopy(next(iter(by_kind(objects, "Deployment").values())))
    _containers(deployment)[0]["livenessprobe"] = {}
    with pytest.raises(ManifestError):
        assert_valid(deployment)


NS_LABEL = "kubernetes.io/metadata.name"


# -- what every service gets --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_has_its_companions(overlay: str) -> None:
    """Each service: ServiceAccount, Service, PDB, NetworkPolicy, PodMonitor, KafkaUser."""
    objects = render_overlay(overlay)
    deployments = _service_deployments(objects)
    assert deployments
    for kind in (
        "ServiceAccount",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "PodMonitor",
        "KafkaUser",
    ):
        missing = set(deployments) - set(by_kind(objects, kind))
        assert not missing, f"{overlay}: no {kind} for {sorted(missing)}"
    assert not by_kind(objects, "ServiceMonitor"), "metrics are scraped from the pods"
    for name in deployments:
        (endpoint,) = by_kind(objects, "PodMonitor")[name]["spec"]["podMetricsEndpoints"]
        assert endpoint["path"] == "/metrics" and endpoint["port"] == "metrics", name
        spec = by_kind(objects, "PodMonitor")[name]["spec"]
        assert spec["jobLabel"] == "app.kubernetes.io/part-of", name
    for name, service in by_kind(objects, "Service").items():
        assert service["metadata"]["labels"]["app.kubernetes.io/part-of"] == "omni", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_have_their_own_port_that_only_prometheus_reaches(overlay: str) -> None:
    """The API port serves no metrics; the metrics port is in no Service (so no Ingress can
    route to it) and the NetworkPolicy lets only the monitoring namespace reach it."""
    objects = render_overlay(overlay)
    for name, deployment in _service_deployments(objects).items():
        (container,) = _containers(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert ports["metrics"] != ports["http"], name
        assert env["METRICS_PORT"] == str(ports["metrics"]), name
        service = by_kind(objects, "Service")[name]
        assert [p["name"] for p in service["spec"]["ports"]] == ["http"], name
        rules = by_kind(objects, "NetworkPolicy")[name]["spec"]["ingress"]
        reach = {
            port["port"]: {peer["namespaceSelector"]["matchLabels"][NS_LABEL] for peer in r["from"]}
            for r in rules
            for port in r["ports"]
        }
        assert reach == {"http": {"ingress-nginx"}, "metrics": {"monitoring"}}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_are_hardened_and_probed(overlay: str) -> None:
    """Non-root, read-only root, no capabilities, seccomp, probes, graceful stop, /tmp."""
    for name, deployment in _service_deployments(render_overlay(overlay)).items():
        pod = deployment["spec"]["template"]["spec"]
        pod_sc = pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["terminationGracePeriodSeconds"] >= 30, name
        assert pod["automountServiceAccountToken"] is False, name
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in _containers(deployment):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert container["args"] == [name], name
            assert {"requests", "limits"} <= set(container["resources"]), name
            assert any(
                m["mountPath"] == "/tmp" and m["name"] in tmp_volumes
                for m in container["volumeMounts"]
            ), f"{name}: /tmp must be an emptyDir"
            env = {e["name"]: e for e in container["env"]}
            assert env["SERVICE_NAME"]["value"] == name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_only_by_reference(overlay: str) -> None:
    """No Secret objects and no secret-looking env var with an inline value."""
    objects = render_overlay(overlay)
    assert not by_kind(objects, "Secret"), "Secrets must not be rendered from the repository"
    for name, deployment in by_kind(objects, "Deployment").items():
        for container in _containers(deployment):
            for env in container.get("env", []):
                if SECRET_ENV.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (
                        f"{name}: {env['name']} must come from a Secret"
                    )
                value = env.get("value", "")
                assert not re.search(r"://[^/\s]*:[^/\s]*@", value), (
                    f"{name}: {env['name']} has credentials inline"
                )
    for name, cm in by_kind(objects, "ConfigMap").items():
        for key in cm.get("data", {}):
            assert not SECRET_ENV.search(key), f"ConfigMap {name} holds {key}: use a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_configmaps_exist(overlay: str) -> None:
    """envFrom ConfigMaps resolve to rendered ConfigMaps (kustomize hash suffixes included)."""
    objects = render_overlay(overlay)
    configmaps = set(by_kind(objects, "ConfigMap"))
    for name, deployment in by_kind(objects, "Deployment").items():
        for container in _containers(deployment):
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {}).get("name")
                if ref:
                    assert ref in configmaps, f"{name}: ConfigMap {ref} is not rendered"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_their_service(overlay: str) -> None:
    """Every policy isolates both directions of exactly its service's pods."""
    objects = render_overlay(overlay)
    deployments = _service_deployments(objects)
    for name, policy in by_kind(objects, "NetworkPolicy").items():
        spec = policy["spec"]
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}, name
        selector = spec["podSelector"]["matchLabels"]
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), name


def test_kafka_in_kraft_with_node_pools() -> None:
    """Both overlays have a Kafka cluster whose node pools hold controllers and brokers."""
    for overlay in OVERLAYS:
        objects = render_overlay(overlay)
        (kafka,) = by_kind(objects, "Kafka").values()
        assert "zookeeper" not in kafka["spec"]
        roles = {
            role
            for pool in by_kind(objects, "KafkaNodePool").values()
            if pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
            for role in pool["spec"]["roles"]
        }
        assert roles == {"controller", "broker"}, overlay
        listener = kafka["spec"]["kafka"]["listeners"][0]
        assert listener["tls"] and listener["authentication"]["type"] == "scram-sha-512"
        assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"


def test_prod_uses_cloudnativepg_and_dev_an_external_secret() -> None:
    """prod reads DATABASE_URL from CloudNativePG's app secret; dev from omni-database."""
    expected = {"prod": ("omni-pg-app", "uri"), "dev": ("omni-database", "DATABASE_URL")}
    for overlay, (secret, key) in expected.items():
        objects = render_overlay(overlay)
        if overlay == "prod":
            assert "omni-pg" in by_kind(objects, "Cluster")
        for name, deployment in _service_deployments(objects).items():
            env = {e["name"]: e for e in _containers(deployment)[0]["env"]}
            ref = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret, key), f"{overlay}/{name}"


def test_dashboards_are_shipped_as_configmaps() -> None:
    """Every dashboard JSON file is in a ConfigMap for Grafana's sidecar, byte for byte."""
    from deploy_metrics import DASHBOARD_DIR

    files = {p.name: p.read_text() for p in DASHBOARD_DIR.glob("*.json")}
    shipped: dict[str, str] = {}
    for cm in by_kind(render_overlay("prod"), "ConfigMap").values():
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            shipped.update(cm["data"])
    assert shipped == files


# What a Secret holds, in the shape the settings check (anything else: a long random string).
SECRET_SHAPES = {
    "API_KEYS": "ops:stand-in-key-0123456789:admin",
    "DATABASE_URL": "postgresql://omni:stand-in@omni-pg-rw/omni",
}


def _environment(objects: tuple[dict[str, Any], ...], name: str) -> dict[str, str]:
    """What a service's container finds in its environment: its ConfigMap's literals, then its
    own env (a value from a Secret as a stand-in of its shape)."""
    (container,) = _containers(_service_deployments(objects)[name])
    configmaps = by_kind(objects, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]].get("data", {}))
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            env[entry["name"]] = SECRET_SHAPES.get(
                entry["name"], f"from-a-secret-{entry['name'].lower()}-0123456789"
            )
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_starts_with_what_its_overlay_gives_it(overlay: str) -> None:
    """No service refuses its overlay's settings; prod's also pin shopper tokens' issuer and
    audience (so no start-up warning), from Secrets, and sign unsubscribe links with one
    secret for every replica."""
    from omni_common.service import service_factories
    from omni_common.settings import ServiceSettings

    objects = render_overlay(overlay)
    for name in _service_deployments(objects):
        # The service's own settings class, from an app built (not started) to describe it.
        app = service_factories()[name].load()(ServiceSettings(service_name=name))
        settings_class = type(app.state.runtime.settings)
        with pytest.MonkeyPatch.context() as patch:
            for variable in list(os.environ):
                if variable.isupper() and not variable.startswith(("PATH", "HOME", "PYTHON")):
                    patch.delenv(variable)
            for variable, value in _environment(objects, name).items():
                patch.setenv(variable, value)
            settings = settings_class()
        assert settings.startup_refusals() == [], f"{overlay}/{name}"
        assert settings.development is (overlay == "dev"), f"{overlay}/{name}"
        if overlay == "prod":
            assert settings.startup_warnings() == [], f"{overlay}/{name}"
            (container,) = _containers(_service_deployments(objects)[name])
            refs = {
                e["name"]: e["valueFrom"]["secretKeyRef"]
                for e in container["env"]
                if "secretKeyRef" in e.get("valueFrom", {})
            }
            assert refs["SHOPPER_TOKEN_ISSUER"]["name"] == "omni-shopper-tokens", name
            assert refs["SHOPPER_TOKEN_AUDIENCE"]["name"] == "omni-shopper-tokens", name
            if name == "notification":
                assert refs["UNSUBSCRIBE_SECRET"]["name"] == "omni-notification"
                assert refs["UNSUBSCRIBE_SECRET_PREVIOUS"].get("optional") is True


def test_prod_postgres_replicates_synchronously() -> None:
    """A commit is on a standby's disk too before it returns, and waits when none can confirm:
    a failover never loses an effect whose Kafka offset was committed after it."""
    (cluster,) = by_kind(render_overlay("prod"), "Cluster").values()
    spec = cluster["spec"]
    assert spec["minSyncReplicas"] >= 1
    assert spec["minSyncReplicas"] <= spec["maxSyncReplicas"] < spec["instances"]
