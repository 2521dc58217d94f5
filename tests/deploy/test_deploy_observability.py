"""Alert rules have runbooks and pass promtool; dashboards are well-formed and cover SRE's needs."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
from deploy_manifests import REPO_ROOT
from deploy_metrics import (
    DASHBOARD_DIR,
    RULES_DIR,
    dashboard_exprs,
    dashboard_metric_names,
    load_dashboards,
    load_rules,
)

RUNBOOK_DIR = REPO_ROOT / "deploy" / "runbooks"
RUNBOOK_SECTIONS = ("## What it means", "## What to check", "## How to recover")


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def test_the_required_alerts_exist() -> None:
    """Lag growing, DLQ non-empty, outbox age, error rate, service not ready."""
    exprs = {rule["alert"]: rule["expr"] for rule in _alerts()}
    required = {
        "omni_consumer_lag": "consumer lag growing",
        "omni_dlq_messages_total": "DLQ non-empty",
        "omni_outbox_oldest_age_seconds": "outbox backlog age",
        "omni_http_requests_total": "error rate",
        "omni_ready": "service not ready",
    }
    for metric, what in required.items():
        assert any(metric in expr for expr in exprs.values()), f"no alert on {what} ({metric})"


def test_every_alert_has_a_runbook_and_annotations() -> None:
    """runbook_url -> deploy/runbooks/<alert>.md, which says what, what to check, how to fix."""
    alerts = _alerts()
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        url = annotations["runbook_url"]
        assert url.startswith("https://") and url.endswith(f"/deploy/runbooks/{name}.md"), url
        runbook = RUNBOOK_DIR / f"{name}.md"
        assert runbook.is_file(), f"missing runbook {runbook}"
        text = runbook.read_text()
        assert text.startswith(f"# {name}\n"), runbook
        for section in RUNBOOK_SECTIONS:
            assert section in text, f"{runbook.name} lacks '{section}'"
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    orphans = {p.stem for p in RUNBOOK_DIR.glob("Omni*.md")} - set(names)
    assert not orphans, f"runbooks of no alert: {orphans}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    """promtool parses the rules and their unit tests (deploy/prometheus/tests) pass."""
    rule_files = [str(p) for p in sorted(RULES_DIR.glob("*.yml"))]
    check = subprocess.run(
        ["promtool", "check", "rules", *rule_files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted((REPO_ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
    assert tests
    result = subprocess.run(
        ["promtool", "test", "rules", *[p.name for p in tests]],
        cwd=tests[0].parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_are_well_formed() -> None:
    """Unique uids and panel ids, a datasource variable, queries on every panel."""
    dashboards = load_dashboards()
    assert len(dashboards) >= 3
    uids = [d["uid"] for d in dashboards.values()]
    assert len(uids) == len(set(uids))
    for file_name, dashboard in dashboards.items():
        assert dashboard["title"].startswith("Omni / "), file_name
        assert file_name == f"{dashboard['uid']}.json"
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        ids = []
        for panel in dashboard["panels"]:
            ids.append(panel["id"])
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{file_name}: {panel['title']} overflows"
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
            for target in panel["targets"]:
                assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
        assert len(ids) == len(set(ids)), f"{file_name}: duplicate panel ids"


def test_dashboards_show_what_sre_and_the_business_need() -> None:
    """RED per service, lag per group, DLQ, outbox; availability latency, orders, lost demand."""
    dashboards = load_dashboards(DASHBOARD_DIR)
    used = set().union(*(dashboard_metric_names(d) for d in dashboards.values()))
    required = {
        # per-service RED
        "omni_http_requests_total",
        "omni_http_request_duration_seconds_bucket",
        "omni_events_handled_total",
        "omni_event_handling_seconds_bucket",
        # Kafka pipeline
        "omni_consumer_lag",
        "omni_dlq_messages_total",
        "omni_outbox_backlog",
        "omni_outbox_oldest_age_seconds",
        # business
        "omni_inventory_stock_to_availability_seconds_bucket",
        "omni_orders_by_status",
        "omni_inventory_out_of_stock_transitions_total",
        "omni_inventory_lost_demand_units_total",
        "omni_inventory_lost_demand_value_total",
    }
    assert required <= used, f"missing on dashboards: {sorted(required - used)}"
    red = dashboards["omni-service-red.json"]
    assert any(p.get("repeat") == "service" for p in red["panels"]), "RED must be per service"
    lag = " ".join(dashboard_exprs(dashboards["omni-kafka-pipeline.json"]))
    assert "by (group)" in lag, "consumer lag must be shown per group"
