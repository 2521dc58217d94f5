"""Which metric names the dashboards and alert rules use, and whether the services export them.

PromQL is parsed roughly, but on purpose: string literals, label matchers ``{...}``, ranges
``[...]``, grouping clauses (``by (...)``, ``on (...)``...) and Grafana variables are removed;
what is left that looks like an identifier and is not followed by ``(`` (a function or an
aggregation) nor a keyword is a metric name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"
RULES_DIR = REPO_ROOT / "deploy" / "prometheus" / "rules"

PROMETHEUS_SYNTHETIC = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)
"""Series Prometheus itself records for every scrape target (no service exports them)."""

PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "inf",
        "nan",
        "atan2",
    }
)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((.*)\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((.*)\)\s*$", re.DOTALL)
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def grafana_query_metric_names(query: str) -> set[str]:
    """Metric names in a Grafana Prometheus template-variable query."""
    for pattern in (_LABEL_VALUES, _QUERY_RESULT):
        match = pattern.match(query)
        if match:
            inner = match.group(1)
            if pattern is _LABEL_VALUES:
                # label_values(label) reads no metric; label_values(expr, label) reads expr's.
                head, sep, _label = inner.rpartition(",")
                return promql_metric_names(head) if sep else set()
            return promql_metric_names(inner)
    if re.match(r"^\s*(label_names|metrics)\s*\(", query):
        return set()
    return promql_metric_names(query)


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard's panels."""
    return [
        target["expr"]
        for panel in _panels(dashboard.get("panels") or [])
        for target in panel.get("targets") or []
        if target.get("expr")
    ]


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Metric names a dashboard reads: panels and template variables."""
    names: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        names |= promql_metric_names(expr)
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and query:
            names |= grafana_query_metric_names(query)
    return names


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """Every dashboard JSON file, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def load_rules(directory: Path = RULES_DIR) -> list[dict[str, Any]]:
    """Every rule (alerting or recording) of every rule file."""
    rules: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


def names_in_dashboards_and_rules() -> dict[str, set[str]]:
    """Metric name -> where it is used (dashboard files, ``rule:<name>``)."""
    used: dict[str, set[str]] = {}
    for file_name, dashboard in load_dashboards().items():
        for name in dashboard_metric_names(dashboard):
            used.setdefault(name, set()).add(file_name)
    recorded = set()
    for rule in load_rules():
        where = f"rule:{rule.get('alert') or rule.get('record')}"
        if "record" in rule:
            recorded.add(rule["record"])
        for name in promql_metric_names(rule["expr"]):
            used.setdefault(name, set()).add(where)
    # Recording rules' outputs are produced by Prometheus, not the services.
    for name in recorded:
        used.pop(name, None)
    return used


def exported_metric_names(exposition_texts: Iterable[str]) -> set[str]:
    """Every series name the exposition texts make queryable, with the type's suffixes.

    Families declared with ``# TYPE`` but without samples yet (labelled metrics nobody has
    touched) count: their names are fixed by the code, their series appear with traffic.
    """
    names: set[str] = set()
    for text in exposition_texts:
        for family in text_string_to_metric_families(text):
            base = family.name
            if family.type == "counter":
                names |= {f"{base}_total", f"{base}_created"}
            elif family.type == "histogram":
                names |= {f"{base}{s}" for s in (*_HISTOGRAM_SUFFIXES, "_created")}
            elif family.type == "gaugehistogram":
                names |= {f"{base}_bucket", f"{base}_gsum", f"{base}_gcount"}
            elif family.type == "summary":
                names |= {base, f"{base}_sum", f"{base}_count", f"{base}_created"}
            elif family.type == "info":
                names.add(f"{base}_info")
            else:
                names.add(base)
            names |= {sample.name for sample in family.samples}
    return names


def assert_metrics_exported(names_in_dashboards: set[str], exposition_texts: list[str]) -> None:
    """Fail unless every metric name used by dashboards/alerts is exported by some service.

    ``exposition_texts`` are the bodies of the services' ``/metrics`` (Prometheus text
    format). Histogram names may be used with ``_bucket``/``_sum``/``_count``; Prometheus'
    own per-target series (``up``...) are always accepted.
    """
    if not exposition_texts:
        raise AssertionError("no /metrics exposition to compare with")
    exported = exported_metric_names(exposition_texts)
    missing = sorted(
        name
        for name in names_in_dashboards
        if name not in exported and name not in PROMETHEUS_SYNTHETIC
    )
    if missing:
        raise AssertionError(
            "metrics used in dashboards/alerts but exported by no service: " + ", ".join(missing)
        )
