"""The Grafana dashboard as the tests see it: its panels and PromQL expressions, the metric names they read, and
Grafana's template variables substituted the way Grafana would before sending a query to Prometheus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = ROOT / "grafana" / "dashboards" / "broker.json"

# The metric names the API document lists under "Operations"; histograms are exported as _bucket, _sum, _count.
COUNTERS = (
    "broker_messages_published_total",
    "broker_messages_delivered_total",
    "broker_messages_acked_total",
    "broker_messages_nacked_total",
    "broker_messages_redelivered_total",
    "broker_messages_failed_total",
    "broker_http_requests_total",
)
GAUGES = ("broker_queue_messages", "broker_queue_oldest_pending_age_seconds", "broker_sse_clients", "broker_redis_up")
HISTOGRAMS = (
    "broker_message_processing_seconds",
    "broker_http_request_duration_seconds",
    "broker_journal_commit_seconds",
    "broker_journal_batch_size",
)
ALLOWED_METRICS = frozenset(
    [*COUNTERS, *GAUGES, *(h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count"))]
)
PROCESS_PREFIX = "process_"  # prometheus-client's default process collector

# What Grafana puts in place of its built-in interval variables (the scrape interval in compose is 5 s).
BUILTIN_VARIABLES = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m", "__range_s": "300"}

_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_TOKEN = re.compile(
    r"(?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)"
    r"|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?"
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def load() -> dict[str, Any]:
    data = json.loads(DASHBOARD_PATH.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panels(panel)
        else:
            yield panel


def rows(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in dashboard.get("panels", []) if p.get("type") == "row")


def exprs(panel: Mapping[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr") and not t.get("hide")]


def all_exprs(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p.get("title", ""), e) for p in panels(dashboard) for e in exprs(p)]


def variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(variable name, series selector) of every Prometheus query variable: label_values(<selector>, <label>)."""
    found = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", text)
        assert match, f"variable {variable.get('name')}: expected label_values(<metric>, <label>), got {text!r}"
        found.append((str(variable["name"]), match.group(1)))
    return found


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace $var, ${var}, ${var:format} and [[var]] by values (Grafana's built-ins included); unknown: KeyError."""
    merged = {**BUILTIN_VARIABLES, **values}

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in merged:
            raise KeyError(f"no value for template variable ${name} in {expr!r}")
        return merged[name]

    return _VARIABLE.sub(replace, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label names
    (matchers and by/without/on/ignoring/group_* lists) or numbers/durations."""
    text = _VARIABLE.sub("1", expr)  # a variable stands for a value or a duration, never for a metric name
    text = _STRING.sub('""', text)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+-?\S+", " ", text, flags=re.IGNORECASE)
    names = set()
    for token in _TOKEN.finditer(text):
        name = token.group("name")
        if name and not token.group("call") and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def is_allowed(name: str) -> bool:
    return name in ALLOWED_METRICS or name.startswith(PROCESS_PREFIX)
