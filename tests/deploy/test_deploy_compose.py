"""docker-compose.yml validates against the Compose schema and wires the platform correctly."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_manifests import COMPOSE_SCHEMA, REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed compose file (YAML anchors and merge keys resolved)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _service_names() -> list[str]:
    try:
        from omni_common.service import service_names
    except ImportError:  # pragma: no cover
        return ["order", "inventory", "customer-profile", "notification", "loyalty"]
    return service_names()


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    """The official Compose JSON schema (draft-07) accepts the file."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_every_service_runs_with_health_checks_and_ordered_start(compose: dict[str, Any]) -> None:
    """Each platform service: its command, /readyz health check, depends_on conditions."""
    services = compose["services"]
    for name in _service_names():
        assert name in services, f"{name} is missing from docker-compose.yml"
        svc = services[name]
        assert svc["command"] == [name]
        assert svc["environment"]["SERVICE_NAME"] == name
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        deps = svc["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["topics"]["condition"] == "service_completed_successfully"
        env = svc["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["HTTP_HOST"] == "0.0.0.0" and str(env["HTTP_PORT"]) == "8000"
        # Metrics on their own port, scraped by Prometheus inside the compose network only.
        assert str(env["METRICS_PORT"]) == "9464"
        published = " ".join(str(p) for p in svc.get("ports", []))
        assert "9464" not in published, f"{name} publishes its metrics port"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]


def test_infrastructure_and_observability_are_present(compose: dict[str, Any]) -> None:
    """Kafka in KRaft, PostgreSQL, topic creation, OTel, traces, Prometheus, Grafana, mail."""
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "healthcheck" in kafka and "healthcheck" in services["postgres"]
    topics = services["topics"]
    assert topics["command"] == ["create-topics"]  # omni-service create-topics
    assert topics["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    images = " ".join(svc.get("image", "") for svc in services.values())
    for image in ("opentelemetry-collector", "prometheus", "grafana", "mailpit"):
        assert image in images, f"no {image} in docker-compose.yml"
    assert re.search(r"jaeger|tempo", images), "no trace store (Jaeger or Tempo)"


def test_mounted_config_files_exist(compose: dict[str, Any]) -> None:
    """Every ./ bind mount points at a file or directory in the repository."""
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name}: {source} does not exist"


def test_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    """Passwords and keys are ${VAR...} interpolations (dev defaults at most), never literals."""
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|API_KEYS|SECRET", key):
                assert "${" in str(value), f"{name}: {key} must come from the environment"
            if key == "DATABASE_URL":
                assert "${POSTGRES_PASSWORD" in value, f"{name}: password inline in DATABASE_URL"
            # No secret has a default in the repository: ${VAR:?...} or an empty default.
            for default in re.findall(r"\$\{(\w+):-([^}]*)\}", str(value)):
                if re.search(r"PASSWORD|API_KEYS|SECRET", default[0]):
                    assert default[1] == "", f"{name}: {default[0]} has a default in the repo"


def test_the_env_template_names_every_required_secret(compose: dict[str, Any]) -> None:
    """Compose refuses to start without its secrets; .env.example says which they are."""
    text = (REPO_ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"API_KEYS", "POSTGRES_PASSWORD"} <= required
    template = (REPO_ROOT / ".env.example").read_text()
    named = set(re.findall(r"^(\w+)=", template, flags=re.MULTILINE))
    assert required <= named, f"missing from .env.example: {required - named}"
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()


def test_prometheus_scrapes_every_service_and_loads_the_rules(compose: dict[str, Any]) -> None:
    """The compose Prometheus scrapes each service in job "omni" and loads the rule files."""
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "omni"]
    assert job["honor_labels"] is True
    targets = {sc["labels"]["service"]: sc["targets"][0] for sc in job["static_configs"]}
    assert set(targets) == set(_service_names())
    for name, target in targets.items():
        assert target == f"{name}:9464", "the metrics port (METRICS_PORT), never the API's"
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/rules:/etc/prometheus/rules:ro" in mounts
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
