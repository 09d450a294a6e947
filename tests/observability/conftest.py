"""Paths and tools for the observability tests: the dashboard, the alert rules, promtool, helm."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from deploy.paths import REPO_ROOT
from tests.k8s.chart import helm_binary

CHART = REPO_ROOT / "k8s" / "qwen-serve"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
OBSERVABILITY = REPO_ROOT / "k8s" / "observability"
RULES = OBSERVABILITY / "alerts.rules.yaml"
RULES_TESTS = OBSERVABILITY / "alerts.test.yaml"
PROMETHEUS_BIN = REPO_ROOT / ".cache" / "prometheus" / "usr" / "bin"


def load_script(name: str) -> ModuleType:
    """A script of k8s/observability (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"observability_{name}", OBSERVABILITY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool(path: Path, how: str) -> Path:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: {how}")
    return path


@pytest.fixture(scope="session")
def promtool() -> Path:
    return _tool(PROMETHEUS_BIN / "promtool", "run make prometheus")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    return _tool(PROMETHEUS_BIN / "prometheus", "run make prometheus")


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="session")
def render_rules() -> ModuleType:
    return load_script("render_rules")


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows excluded), nested row panels included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(p for p in panel.get("panels", []) if p.get("type") != "row")
        else:
            found.append(panel)
    return found


VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def substitute(expr: str, values: dict[str, str]) -> str:
    """What Grafana sends for `expr` with these variable values (fails on any variable not given)."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"no value for ${name} in {expr}")
        return values[name]
    return VARIABLE.sub(value, expr)
