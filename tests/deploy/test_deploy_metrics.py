"""Every metric named in a dashboard or an alert is one the services really export.

Offline: compared with an exposition built from the real metric code (``PlatformMetrics``,
FastStream's Prometheus middleware) plus the business metrics the services promise.
End to end (``-m e2e``): compared with what the running dev stack's metrics ports serve.
"""

from __future__ import annotations

from typing import Any

import pytest
from deploy_metrics import (
    assert_metrics_exported,
    exported_metric_names,
    grafana_query_metric_names,
    names_in_dashboards_and_rules,
    promql_metric_names,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Business metrics the inventory, order and loyalty services export (names fixed with the lead).
PROMISED_BUSINESS_METRICS: tuple[tuple[type[Any], str, tuple[str, ...]], ...] = (
    (Histogram, "omni_inventory_stock_to_availability_seconds", ("service",)),
    (Counter, "omni_inventory_out_of_stock_transitions", ("service", "location_id")),
    (Counter, "omni_inventory_lost_demand_units", ("service",)),
    (Counter, "omni_inventory_lost_demand_value", ("service", "currency")),
    (Counter, "omni_order_transitions", ("service", "to_status", "channel")),
    (Counter, "omni_order_illegal_transitions", ("service",)),
    (Gauge, "omni_orders_by_status", ("service", "status")),
    (Counter, "omni_loyalty_ledger_entries", ("service", "kind")),
    (Counter, "omni_loyalty_holds_refused", ("service", "reason")),
    (Counter, "omni_loyalty_points_unrecovered", ("service", "what")),
)


def _reference_exposition() -> list[str]:
    """What the services export, built from the code that exports it."""
    from faststream.prometheus.container import MetricsContainer
    from omni_common.metrics import PlatformMetrics

    platform = PlatformMetrics("inventory")
    MetricsContainer(platform.registry, metrics_prefix="faststream", custom_label_names=[])
    business = CollectorRegistry()
    for kind, name, labels in PROMISED_BUSINESS_METRICS:
        kind(name, name, list(labels), registry=business)
    return [generate_latest(platform.registry).decode(), generate_latest(business).decode()]


# -- the PromQL name extraction ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'sum by (service, le) (rate(a_bucket{service=~"$service"}[$__rate_interval]))',
            {"a_bucket"},
        ),
        (
            "histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket[5m])))",
            {"x_seconds_bucket"},
        ),
        ("a / on (job) group_left (team) b > bool 1e3", {"a", "b"}),
        ("x unless x offset 15m", {"x"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ("topk(10, sum without (instance) (increase(c_total[1h])))", {"c_total"}),
        ("max_over_time(g[1h:5m]) or vector(0)", {"g"}),
        ("sum(rate(d_total[${__range}])) * 3600", {"d_total"}),
        ('x{le="+Inf", path=~"/a/{id}"}', {"x"}),
        ("ns:recorded:rate5m > 0", {"ns:recorded:rate5m"}),
        ("deriv(lag[10m]) > 0 and on (group) lag > 100", {"lag"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    """Functions, keywords, labels, strings, durations and variables are not metrics."""
    assert promql_metric_names(expr) == names


def test_grafana_variable_queries() -> None:
    """label_values(metric, label) reads the metric; label_values(label) reads none."""
    assert grafana_query_metric_names("label_values(omni_ready, service)") == {"omni_ready"}
    assert grafana_query_metric_names("label_values(service)") == set()
    assert grafana_query_metric_names('label_values(a{x="1"}, y)') == {"a"}
    assert grafana_query_metric_names("query_result(topk(5, b))") == {"b"}


# -- the comparison -----------------------------------------------------------------------------


def test_assert_metrics_exported_accepts_suffixes_and_declared_families() -> None:
    """Counters by _total, histograms by _bucket/_sum/_count, TYPE-only families count."""
    registry = CollectorRegistry()
    Counter("jobs", "jobs done", ["kind"], registry=registry)  # never incremented
    Histogram("wait_seconds", "wait", registry=registry).observe(0.2)
    Gauge("depth", "queue depth", registry=registry).set(3)
    text = generate_latest(registry).decode()
    assert_metrics_exported(
        {
            "jobs_total",
            "wait_seconds_bucket",
            "wait_seconds_sum",
            "wait_seconds_count",
            "depth",
            "up",
        },
        [text],
    )
    with pytest.raises(AssertionError, match="nope_total"):
        assert_metrics_exported({"jobs_total", "nope_total"}, [text])
    with pytest.raises(AssertionError, match="jobs"):
        assert_metrics_exported({"jobs"}, [text])  # a counter is queried with _total
    with pytest.raises(AssertionError):
        assert_metrics_exported({"depth"}, [])


def test_exported_names_union_over_services() -> None:
    """Each service exports its own metrics; the dashboards may use any of them."""
    a, b = CollectorRegistry(), CollectorRegistry()
    Gauge("only_in_a", "a", registry=a)
    Gauge("only_in_b", "b", registry=b)
    texts = [generate_latest(a).decode(), generate_latest(b).decode()]
    assert {"only_in_a", "only_in_b"} <= exported_metric_names(texts)


def test_dashboards_and_alerts_use_only_metrics_the_code_exports() -> None:
    """Offline: against the real metric definitions plus the promised business metrics."""
    used = names_in_dashboards_and_rules()
    assert used, "no metric found in dashboards and rules"
    try:
        assert_metrics_exported(set(used), _reference_exposition())
    except AssertionError as exc:
        where = {name: sorted(places) for name, places in used.items() if name in str(exc)}
        raise AssertionError(f"{exc}\nused in: {where}") from None


@pytest.mark.e2e
def test_dashboards_and_alerts_use_only_metrics_the_dev_stack_exports(dev_stack: Any) -> None:
    """Scrape every running service's metrics port and compare (needs the `dev_stack`
    fixture)."""
    import httpx

    texts = []
    assert set(dev_stack.metrics_urls) == set(dev_stack.service_urls)
    for name, url in dev_stack.metrics_urls.items():
        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10)
        assert response.status_code == 200, f"{name}: /metrics answered {response.status_code}"
        texts.append(response.text)
    assert_metrics_exported(set(names_in_dashboards_and_rules()), texts)
