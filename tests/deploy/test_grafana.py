"""grafana/: the provisioned datasource and dashboard provider, and the broker dashboard: every query reads only the
broker's documented metric names (or the process collector's), and the dashboard has the panels operators need."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.deploy import dashboard as dash

PROVISIONING = dash.ROOT / "grafana" / "provisioning"


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return dash.load()


def _flat(expr: str) -> str:
    return re.sub(r"\s+", " ", expr)


# -- the metric-name parser is itself right -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (queue) (rate(broker_messages_published_total{queue=~"$queue"}[$__rate_interval]))',
         {"broker_messages_published_total"}),
        ("histogram_quantile(0.99, sum by (le, route) (rate(broker_http_request_duration_seconds_bucket[5m])))",
         {"broker_http_request_duration_seconds_bucket"}),
        ('(sum(rate(broker_http_requests_total{status=~"5.."}[1m])) or vector(0)) / sum(rate(x_total[1m]))',
         {"broker_http_requests_total", "x_total"}),
        ("rate(a[5m] offset 1h) / on (instance) group_left (job) b * 1e3 > bool 0.5",
         {"a", "b"}),
        ('label_replace(up, "dst", "sum(rate(fake[1m]))", "src", "(.*)")', {"up"}),
        ("max_over_time(broker_redis_up[10m:1m])", {"broker_redis_up"}),
    ],
)
def test_metric_names_parser(expr: str, names: set[str]) -> None:
    assert dash.metric_names(expr) == names


def test_parser_catches_an_undocumented_name() -> None:
    names = dash.metric_names("sum(rate(broker_messages_published[5m]))")  # _total missing
    assert names == {"broker_messages_published"}
    assert not dash.is_allowed("broker_messages_published")
    assert not dash.is_allowed("broker_message_processing_seconds"), "a histogram is read through its series"
    assert dash.is_allowed("broker_message_processing_seconds_bucket")
    assert dash.is_allowed("process_resident_memory_bytes")


# -- provisioning ---------------------------------------------------------------------------------------------


def test_datasource_provisioning() -> None:
    config = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["access"] == "proxy"


def test_dashboard_provider() -> None:
    config = yaml.safe_load((PROVISIONING / "dashboards" / "broker.yml").read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


# -- the dashboard ----------------------------------------------------------------------------------------------


def test_dashboard_shape(board: dict[str, Any]) -> None:
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]] + [p["id"] for r in dash.rows(board) for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dash.panels(board):
        title = panel.get("title")
        assert title, f"panel {panel['id']} has a title"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr") for t in targets), f"{title}: every target has a PromQL expr"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: refIds are unique"
        for source in [panel.get("datasource"), *(t.get("datasource") for t in targets)]:
            assert source is None or source == {"type": "prometheus", "uid": "prometheus"}, (
                f"{title}: the provisioned datasource (uid prometheus), got {source}"
            )
    titles = [p["title"] for p in dash.panels(board)]
    assert len(titles) == len(set(titles)), "panel titles are unique"


def test_every_query_uses_only_documented_metric_names(board: dict[str, Any]) -> None:
    queries = dash.all_exprs(board) + [(f"${name}", q) for name, q in dash.variable_queries(board)]
    assert queries
    bad = {}
    for title, expr in queries:
        assert "__name__" not in expr, f"{title}: select metrics by name, not by __name__ matchers"
        names = dash.metric_names(expr)
        assert names, f"{title}: {expr!r} reads no metric"
        if unknown := {n for n in names if not dash.is_allowed(n)}:
            bad[f"{title}: {expr}"] = sorted(unknown)
    assert not bad, f"undocumented metric names: {bad}"


def test_template_variables_are_all_defined(board: dict[str, Any]) -> None:
    """Every $variable in a query is one of the dashboard's or one of Grafana's built-ins."""
    variables = {v["name"]: ".*" for v in board.get("templating", {}).get("list", [])}
    for title, expr in dash.all_exprs(board):
        dash.substitute(expr, variables)  # KeyError names an undefined variable
        assert "$" not in dash.substitute(expr, variables), title
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("includeAll"):
            assert variable.get("allValue") == ".*", "All selects every queue, also ones not yet in the options"


def _quantiles(exprs: list[str], series: str) -> set[str]:
    pattern = rf"histogram_quantile\(\s*([0-9.]+)\s*,.*\b{series}\b"
    return {m.group(1) for e in exprs if (m := re.search(pattern, _flat(e)))}


def _grouped_by(expr: str, label: str) -> bool:
    return bool(re.search(rf"\bby\s*\([^)]*\b{label}\b[^)]*\)", expr))


def _rate_per_queue(counter: str) -> Callable[[list[str]], bool]:
    return lambda exprs: any(re.search(rf"\brate\(\s*{counter}\b", e) and _grouped_by(e, "queue") for e in exprs)


REQUIRED: dict[str, Callable[[list[str]], bool]] = {
    "publish rate per queue": _rate_per_queue("broker_messages_published_total"),
    "deliver rate per queue": _rate_per_queue("broker_messages_delivered_total"),
    "ack rate per queue": _rate_per_queue("broker_messages_acked_total"),
    "nack rate per queue": _rate_per_queue("broker_messages_nacked_total"),
    "fail rate per queue": _rate_per_queue("broker_messages_failed_total"),
    "queue depth per status": lambda exprs: any(
        "broker_queue_messages" in e and _grouped_by(e, "status") for e in exprs),
    "oldest pending age": lambda exprs: any("broker_queue_oldest_pending_age_seconds" in e for e in exprs),
    "processing time quantiles": lambda exprs: len(
        _quantiles(exprs, "broker_message_processing_seconds_bucket")) >= 2,
    "HTTP request rate per route": lambda exprs: any(
        re.search(r"\brate\(\s*broker_http_requests_total\b", e) and _grouped_by(e, "route") for e in exprs),
    "HTTP p50 and p99 latency per route": lambda exprs: {"0.5", "0.99"} <= _quantiles(
        [e for e in exprs if _grouped_by(e, "route")], "broker_http_request_duration_seconds_bucket"),
    "HTTP 5xx and 4xx share": lambda exprs: all(
        any(re.search(rf'broker_http_requests_total\{{[^}}]*status=~"{cls}\.\."', e) and "/" in e for e in exprs)
        for cls in ("5", "4")),
    "journal commit latency": lambda exprs: bool(_quantiles(exprs, "broker_journal_commit_seconds_bucket")),
    "journal batch size": lambda exprs: any(re.search(r"\bbroker_journal_batch_size_(bucket|sum)\b", e) for e in exprs),
    "SSE clients": lambda exprs: any("broker_sse_clients" in e for e in exprs),
    "Redis up": lambda exprs: any("broker_redis_up" in e for e in exprs),
    "process CPU": lambda exprs: any(re.search(r"\brate\(\s*process_cpu_seconds_total\b", e) for e in exprs),
    "process memory": lambda exprs: any("process_resident_memory_bytes" in e for e in exprs),
}


@pytest.mark.parametrize("need", list(REQUIRED))
def test_dashboard_has_panel(board: dict[str, Any], need: str) -> None:
    """One panel answers each question (its queries together, as they are drawn together)."""
    check = REQUIRED[need]
    matching = [p["title"] for p in dash.panels(board) if check([_flat(e) for e in dash.exprs(p)])]
    assert matching, f"no panel shows the {need}"


def test_queue_panels_follow_the_queue_variable(board: dict[str, Any]) -> None:
    """Where a query reads a per-queue metric, it filters by the $queue variable."""
    per_queue = [m for m in dash.ALLOWED_METRICS if m.startswith(("broker_messages_", "broker_queue_",
                                                                     "broker_message_processing"))]
    names = {name for name, _ in dash.variable_queries(board)}
    assert "queue" in names
    for title, expr in dash.all_exprs(board):
        if dash.metric_names(expr) & set(per_queue):
            assert re.search(r'queue=~"\$\{?queue\}?"', expr), f"{title}: {expr} ignores $queue"
