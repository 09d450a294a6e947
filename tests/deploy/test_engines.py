"""The engine interface: the registry covers every `engine:` a profile may name, callers ask the
profile's engine instead of testing its name, and the names the benchmarks and the chart read
(server module, metrics) are the engines' own."""

from __future__ import annotations

import ast
from typing import get_args

import pytest

from benchmarks import server_metrics
from deploy.chart import CHART_DIR, chart_block
from deploy.engines.base import Engine
from deploy.engines.registry import ENGINES, engine_for
from deploy.loader import known_profiles, load_profile
from deploy.paths import REPO_ROOT
from deploy.profile import Profile
from deploy.render import server_command

ONE_PER_ENGINE = {"vllm": "qwen3-4b-instruct-fp8", "sglang": "qwen3-4b-instruct-fp8-sglang"}


def test_the_registry_has_every_engine_a_profile_may_name() -> None:
    assert set(ENGINES) == set(get_args(Profile.model_fields["engine"].annotation)) == set(ONE_PER_ENGINE)
    assert all(name == engine.name and isinstance(engine, Engine) for name, engine in ENGINES.items())
    assert {load_profile(name).engine for name in known_profiles()} == set(ENGINES)


@pytest.mark.parametrize(("engine", "profile"), ONE_PER_ENGINE.items())
def test_the_server_command_and_the_chart_run_the_engines_server_module(engine: str, profile: str) -> None:
    loaded = load_profile(profile)
    assert engine_for(loaded) is ENGINES[engine]
    argv = server_command(loaded, python="python3").argv
    assert argv[:3] == ["python3", "-m", ENGINES[engine].server_module]
    assert argv[3:] == ENGINES[engine].args(loaded)
    assert chart_block(loaded)["serverModule"] == ENGINES[engine].server_module


def test_every_engines_metrics_fill_the_same_benchmark_report() -> None:
    """The benchmark report compares engines key by key: each engine's names must map onto the
    same report keys (a new engine that forgot one, or named it otherwise, leaves a hole)."""
    needed = {"prompt_tokens", "generation_tokens", "preemptions", "prefix_cache_hits", "requests_finished"}
    peaks = {"peak_kv_cache_usage", "peak_requests_running", "peak_requests_waiting"}
    for name, engine in ENGINES.items():
        assert needed <= set(engine.metrics.counters.values()), name
        assert set(engine.metrics.peak_gauges.values()) == peaks, name
        assert engine.metrics.counters[engine.metrics.requests_finished] == "requests_finished"
        assert engine.metrics.requests_waiting in engine.metrics.peak_gauges
        for gauge, key in engine.metrics.peak_gauges.items():
            assert server_metrics.PEAK_GAUGES[gauge] == key


def test_the_charts_autoscaling_queries_each_engines_queue() -> None:
    template = (CHART_DIR / "templates" / "engine-scaledobject.yaml").read_text()
    for engine in ENGINES.values():
        assert f'"{engine.metrics.requests_waiting}"' in template, engine.name


def test_callers_never_test_the_engines_name() -> None:
    """Outside deploy/engines/, no comparison involves a profile's `.engine` or an engine's name."""
    names = set(ENGINES)
    found = []
    for path in sorted((REPO_ROOT / "deploy").rglob("*.py")):
        if path.parent.name == "engines":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in (node.left, *node.comparators):
                if (isinstance(side, ast.Attribute) and side.attr == "engine") or (
                        isinstance(side, ast.Constant) and side.value in names):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert found == []
