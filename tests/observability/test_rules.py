"""The alert rules: promtool checks and unit tests, drift between the chart and the plain file,
thresholds wired to the chart's values, the PrometheusRule and dashboard ConfigMap templates."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.observability.conftest import (
    CHART,
    DASHBOARD,
    OBSERVABILITY,
    RULES,
    RULES_TESTS,
    query_panels,
)

ALERTS = {"QwenBackendDown", "QwenModelUnavailable", "QwenErrorRatioHigh", "QwenBackendEjected", "QwenProxyInternalErrors",
          "QwenTTFTP99High", "QwenKVCacheNearFull", "QwenPreemptionsRising", "QwenProxySaturated"}
THRESHOLDS = {"backendDownFor": "2m", "errorRatio": 0.05, "ttftP99Seconds": 10, "kvCacheUsage": 0.9,
              "preemptionsPerMinute": 1, "proxyInFlightPerReplica": 256, "backendEjections": 3}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def run(argv: list[str | Path], cwd: Path = OBSERVABILITY) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False)


def test_promtool_check_rules(promtool: Path) -> None:
    result = run([promtool, "check", "rules", RULES])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests(promtool: Path) -> None:
    result = run([promtool, "test", "rules", RULES_TESTS])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_are_the_expected_ones() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    """A quiet case is a test group where the alert never fires (not just 'still pending')."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(RULES_TESTS.read_text())["tests"]:
        by_alert: dict[str, list[bool]] = {}
        for case in group.get("alert_rule_test", []):
            by_alert.setdefault(case["alertname"], []).append(bool(case.get("exp_alerts")))
        for alert, outcomes in by_alert.items():
            (fires if any(outcomes) else quiet).add(alert)
    assert ALERTS - fires == set(), "alerts without a case where they fire"
    assert ALERTS - quiet == set(), "alerts without a case where they stay quiet"


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_alert_has_severity_and_runbook(alert: str) -> None:
    rule = next(r for r in rules() if r["alert"] == alert)
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook"}
    assert "Check:" in annotations["runbook"] and "Do:" in annotations["runbook"]
    assert rule.get("for"), "every alert waits before firing (no flapping on one bad scrape)"


def test_runbooks_name_real_dashboard_panels() -> None:
    titles = {panel["title"] for panel in query_panels(json.loads(DASHBOARD.read_text()))}
    for rule in rules():
        text = " ".join(rule["annotations"]["runbook"].split())
        for name in re.findall(r'"([^"]+)"', text):
            assert name in titles, f"{rule['alert']}'s runbook names a panel that does not exist: {name!r}"


def test_plain_rules_file_matches_the_chart(helm: Path) -> None:
    """alerts.rules.yaml is the chart's template rendered with the default values (make alert-rules)."""
    result = run([sys.executable, OBSERVABILITY / "render_rules.py", "--check", "--helm", helm])
    assert result.returncode == 0, result.stdout + result.stderr


def test_threshold_keys_and_defaults_in_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    thresholds = values["monitoring"]["prometheusRule"]["thresholds"]
    assert thresholds == THRESHOLDS


def test_thresholds_come_from_values(helm: Path, render_rules: ModuleType) -> None:
    custom = {"backendDownFor": "7m", "errorRatio": 0.123, "ttftP99Seconds": 42, "kvCacheUsage": 0.77,
              "preemptionsPerMinute": 9, "proxyInFlightPerReplica": 1234, "backendEjections": 6}
    manifest = render_rules.helm_template(helm, values=["monitoring.prometheusRule.enabled=true"] + [
        f"monitoring.prometheusRule.thresholds.{key}={value}" for key, value in custom.items()])
    rendered = {rule["alert"]: rule for group in render_rules.rules_from_manifest(manifest)["groups"]
                for rule in group["rules"]}
    assert rendered["QwenBackendDown"]["for"] == "7m"
    assert "7m" in rendered["QwenBackendDown"]["annotations"]["description"]
    assert rendered["QwenErrorRatioHigh"]["expr"].rstrip().endswith("> 0.123")
    assert rendered["QwenTTFTP99High"]["expr"].rstrip().endswith("> 42")
    assert "vllm:kv_cache_usage_perc > 0.77" in rendered["QwenKVCacheNearFull"]["expr"]
    assert rendered["QwenPreemptionsRising"]["expr"].rstrip().endswith("> 9")
    assert rendered["QwenProxySaturated"]["expr"].rstrip().endswith("> 1234")
    assert rendered["QwenBackendEjected"]["expr"].rstrip().endswith(">= 6")
    # Prometheus' own templates survive Helm's tpl untouched.
    assert "{{ $labels.model }}" in rendered["QwenErrorRatioHigh"]["annotations"]["summary"]


def test_prometheusrule_manifest(helm: Path, render_rules: ModuleType) -> None:
    manifest = render_rules.helm_template(helm, values=[
        "monitoring.prometheusRule.enabled=true", "monitoring.prometheusRule.labels.release=kube-prometheus",
        "monitoring.prometheusRule.labels.tier=1"])
    (doc,) = [d for d in yaml.safe_load_all(manifest) if d]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    labels = doc["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus" and labels["tier"] == "1"  # label values are strings
    assert labels["app.kubernetes.io/part-of"] == "qwen-serve"  # the chart's own labels are kept
    assert {r["alert"] for g in doc["spec"]["groups"] for r in g["rules"]} == ALERTS


def test_prometheusrule_off_by_default(helm: Path, render_rules: ModuleType) -> None:
    manifest = render_rules.helm_template(helm, values=[], template=None)
    assert [d for d in yaml.safe_load_all(manifest) if d] == []


def test_dashboard_configmap_carries_the_dashboard(helm: Path, render_rules: ModuleType) -> None:
    parts = ("Chart.yaml", "values.yaml", "templates/_helpers.tpl", "templates/grafana-dashboard.yaml",
             "files/grafana-dashboard.json")
    manifest = render_rules.helm_template(helm, values=[
        "monitoring.grafanaDashboard.enabled=true", "monitoring.grafanaDashboard.labels.grafana_dashboard=1"],
        template="templates/grafana-dashboard.yaml", parts=parts)
    (doc,) = [d for d in yaml.safe_load_all(manifest) if d]
    assert doc["kind"] == "ConfigMap"
    assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = doc["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD.read_text())
    assert [d for d in yaml.safe_load_all(render_rules.helm_template(helm, values=[], template=None, parts=parts))
            if d] == []
