"""The Grafana dashboard and alert rules parse and only query metrics the router exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from router.observe.metrics import RouterMetrics
from router.traffic.catalog import Catalog

ROOT = Path(__file__).resolve().parents[1] / "monitoring"
EXPOSED = {"llmserve_requests_total", "llmserve_requests_in_flight", "llmserve_output_tokens_total",
           "llmserve_replica_outstanding_requests", "llmserve_replica_ready", "llmserve_traffic_share_percent"} | {
    f"{name}_bucket" for name in ("llmserve_time_to_first_token_seconds", "llmserve_inter_token_latency_seconds",
                                  "llmserve_time_per_output_token_seconds", "llmserve_e2e_latency_seconds")}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(llmserve_[a-z0-9_]+)", expr))


def test_the_exposed_set_is_what_the_router_registers() -> None:
    text = RouterMetrics(Catalog()).exposition().decode()
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    expected = {"llmserve_requests_total", "llmserve_time_to_first_token_seconds", "llmserve_requests_in_flight"}
    assert expected <= declared


def test_alert_rules_parse_and_query_exposed_metrics() -> None:
    rules = yaml.safe_load((ROOT / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {"LLMServeTTFTAboveSLO", "LLMServeErrorBudgetBurn", "LLMServeNoReadyReplica"}
    for alert in alerts:
        assert metric_names(alert["expr"]) <= EXPOSED, alert["alert"]
    ttft = next(a for a in alerts if a["alert"] == "LLMServeTTFTAboveSLO")
    assert "> 0.5" in ttft["expr"]  # the design's 500 ms TTFT target


def test_dashboard_parses_and_queries_exposed_metrics() -> None:
    dashboard = json.loads((ROOT / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert metric_names(expr) and metric_names(expr) <= EXPOSED, expr
