"""The Grafana dashboard loads as valid Grafana JSON and queries the metrics that exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from serving.metrics import Metrics
from tests.observability.conftest import query_panels, substitute

GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms",
                    "__from", "__to", "__dashboard", "__name", "__org", "__user", "__all", "timeFilter"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+)|\[\[(\w+)\]\])")
SELECTOR = re.compile(r"((?:qwen_proxy|vllm:)[\w:]*)(\{[^}]*\})?")
# Which label of each family names the model (the proxy resolves aliases to the served name).
MODEL_LABEL = {"qwen_proxy": "model", "vllm": "model_name"}
NOT_PER_MODEL = {"Rejected before a backend"}  # panels of requests refused before the model is known


def variables_in(value: Any) -> set[str]:
    """Every $variable referenced anywhere inside a JSON value."""
    if isinstance(value, str):
        return {next(g for g in m.groups() if g) for m in VARIABLE.finditer(value)}
    if isinstance(value, dict):
        return set().union(*(variables_in(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables_in(v) for v in value)) if value else set()
    return set()


def exposed_names(family: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{family}_total"}
    if kind == "histogram":
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    return {family}


def proxy_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    return set().union(*(exposed_names(f.name, f.type) for f in registry.collect()))


def vllm_metric_names() -> set[str]:
    """`vllm:` names as the pinned vLLM defines them (its source, not a blog post's list)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    names: set[str] = set()
    for source in (root / "v1" / "metrics" / "loggers.py", root / "v1" / "spec_decode" / "metrics.py"):
        text = source.read_text()
        # e.g. `self._counter_cls(name="vllm:num_preemptions", ...)`
        for match in re.finditer(r"_(counter|histogram|gauge)_cls\(\s*name=\"(vllm:\w+)\"", text):
            names |= exposed_names(match.group(2), match.group(1))
    assert "vllm:kv_cache_usage_perc" in names, "could not read vLLM's metric definitions"
    return names


def all_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in query_panels(dashboard) for target in panel.get("targets", [])]


def test_top_level_fields(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert "id" not in dashboard or dashboard["id"] is None, "a provisioned dashboard must not carry an id"
    assert {"from", "to"} <= set(dashboard["time"])


def test_panels_have_unique_ids_and_a_grid_position(dashboard: dict[str, Any]) -> None:
    every = dashboard["panels"] + [p for row in dashboard["panels"] for p in row.get("panels", [])]
    ids = [panel["id"] for panel in every]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in every:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and all(isinstance(grid[k], int) for k in "hwxy"), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_panel_queries_with_expr_and_refid(dashboard: dict[str, Any]) -> None:
    for panel in query_panels(dashboard):
        assert panel.get("title") and panel.get("type"), panel
        assert panel.get("description"), f"{panel['title']!r}: say which question the panel answers"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel.get("targets")
        assert targets, f"{panel['title']!r} has no query"
        ref_ids = [t.get("refId") for t in targets]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in targets:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), panel["title"]


def test_every_variable_used_is_defined(dashboard: dict[str, Any]) -> None:
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= defined
    used = variables_in(dashboard["panels"]) | variables_in(dashboard["templating"])
    assert used - defined - GRAFANA_BUILTINS == set()


def test_variables_match_everything_when_all(dashboard: dict[str, Any]) -> None:
    """`.*` as the All value also matches a missing label (Prometheus outside Kubernetes)."""
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "model"):
        assert variables[name]["includeAll"] is True and variables[name]["allValue"] == ".*"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_queries_use_current_metric_names(dashboard: dict[str, Any]) -> None:
    known = proxy_metric_names() | vllm_metric_names()
    for panel, target in all_targets(dashboard):
        for name, _ in SELECTOR.findall(target["expr"]):
            assert name in known, f"{panel['title']!r} queries {name}, which neither the proxy nor vLLM exports"


@pytest.mark.parametrize("needed", ["namespace", "model"])
def test_every_selector_filters_by_the_variables(dashboard: dict[str, Any], needed: str) -> None:
    for panel, target in all_targets(dashboard):
        for name, labels in SELECTOR.findall(target["expr"]):
            if needed == "namespace":
                assert 'namespace=~"$namespace"' in labels, f"{panel['title']!r}: {name}{labels}"
            elif panel["title"] not in NOT_PER_MODEL:
                label = MODEL_LABEL["vllm" if name.startswith("vllm:") else "qwen_proxy"]
                assert f'{label}=~"$model"' in labels, f"{panel['title']!r}: {name}{labels}"


def test_covers_what_the_issue_asks(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(target["expr"] for _, target in all_targets(dashboard))
    for metric in ["qwen_proxy_requests_total", "qwen_proxy_time_to_first_token_seconds_bucket",
                   "qwen_proxy_inter_token_latency_seconds_bucket", "qwen_proxy_request_duration_seconds_bucket",
                   "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                   "vllm:e2e_request_latency_seconds_bucket", "qwen_proxy_prompt_tokens_total",
                   "qwen_proxy_completion_tokens_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                   "qwen_proxy_reasoning_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total",
                   "vllm:prefix_cache_queries_total", "qwen_proxy_backend_up", "qwen_proxy_defaults_applied_total"]:
        assert metric in exprs, f"no panel shows {metric}"


# The queries with a fallback to 0 (`... or on (model) (0 * ...)`), evaluated by promtool on series
# where the counter exists for one model and was never incremented for another.
FALLBACK_SERIES = {  # one sample a minute: rate over [5m] = increment / 60, exact in binary floats
    'qwen_proxy_requests_total{model="tiny-qwen3", route="chat", status_class="2xx"}': "0+15x10",
    'qwen_proxy_requests_total{model="tiny-qwen3", route="chat", status_class="5xx"}': "0+15x10",
    'qwen_proxy_requests_total{model="other", route="chat", status_class="2xx"}': "0+90x10",
    'qwen_proxy_completion_tokens_total{model="tiny-qwen3"}': "0+30x10",
    'qwen_proxy_completion_tokens_total{model="other"}': "0+30x10",
    'qwen_proxy_reasoning_tokens_total{model="tiny-qwen3"}': "0+15x10",
    'qwen_proxy_upstream_errors_total{model="tiny-qwen3", kind="reset"}': "0+6x10",
    'qwen_proxy_greedy_requests_total{model="tiny-qwen3", action="allowed"}': "0+6x10",
    'qwen_proxy_rejected_requests_total{reason="invalid"}': "0+6x10",
}
# (panel, refId): {labels: value} at 10m; no ratio equals its numerator's rate, so a misplaced
# parenthesis (`a or b / c` is `a or (b / c)`) fails.
FALLBACK_EXPECTED = {
    ("5xx ratio", "A"): {"{}": 0.125},
    ("Errors by status class", "B"): {'{model="tiny-qwen3"}': 0.5, '{model="other"}': 0},
    ("Upstream failures by kind", "A"): {'{model="tiny-qwen3", kind="reset"}': 0.1, '{model="other"}': 0},
    ("Rejected before a backend", "A"): {'{reason="invalid"}': 0.1},
    ("Reasoning tokens share", "A"): {'{model="tiny-qwen3"}': 0.5, '{model="other"}': 0},
    ("Greedy requests", "A"): {'{model="tiny-qwen3", action="allowed"}': 0.1, '{model="other"}': 0},
}


def test_zero_fallback_queries_compute_the_right_values(dashboard: dict[str, Any], promtool: Path,
                                                        tmp_path: Path) -> None:
    with_fallback = {(panel["title"], target["refId"]): target["expr"] for panel, target in all_targets(dashboard)
                     if " or " in target["expr"]}
    assert set(with_fallback) == set(FALLBACK_EXPECTED)
    values = {"namespace": ".*", "model": ".*", "__rate_interval": "5m"}
    tests = [{"expr": substitute(expr, values), "eval_time": "10m",
              "exp_samples": [{"labels": labels, "value": value}
                              for labels, value in FALLBACK_EXPECTED[key].items()]}
             for key, expr in with_fallback.items()]
    (tmp_path / "none.rules.yaml").write_text("groups: []\n")
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["none.rules.yaml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "promql_expr_test": tests,
                   "input_series": [{"series": s, "values": v} for s, v in FALLBACK_SERIES.items()]}]}))
    result = subprocess.run([str(promtool), "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
