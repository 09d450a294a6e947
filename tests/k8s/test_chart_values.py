"""Bad values fail `helm template` with a message that names the key and what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from deploy.chart import CHART_DIR
from serving.config import ProxyConfig
from tests.k8s.chart import render, render_error, run_helm, template_args


def values_file(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_string_gpu_count_is_refused_by_the_schema(tmp_path: Path) -> None:
    values = values_file(tmp_path, {"models": {"qwen3-4b-instruct-fp8": {"enabled": True}},
                                    "engine": {"gpusPerNode": "2"}})
    error = render_error([values])
    assert "/engine/gpusPerNode" in error and "want integer" in error


def test_string_gpu_count_per_model_is_refused(tmp_path: Path) -> None:
    values = values_file(tmp_path, {"models": {"qwq-32b": {"enabled": True, "engine": {"gpusPerNode": "two"}}}})
    error = render_error([values])
    assert "/models/qwq-32b/engine/gpusPerNode" in error and "want integer" in error


def test_unknown_model_profile_names_the_known_ones() -> None:
    error = render_error(sets=["models.qwq-64b.enabled=true"])
    assert 'models.qwq-64b: unknown model profile "qwq-64b"' in error
    assert ("Known profiles: qwen3-4b-instruct-fp8, qwen3-4b-instruct-fp8-sglang, qwen3-4b-thinking-fp8, "
            "qwen3-4b-thinking-fp8-sglang, qwq-32b, qwq-32b-sglang, qwq-32b-short") in error


def test_tensor_parallel_beyond_a_node_without_ray_is_refused() -> None:
    error = render_error(sets=["models.qwq-32b-short.enabled=true", "engine.gpusPerNode=1"])
    assert "models.qwq-32b-short: tensor 2 x pipeline 1 = 2 GPUs, but a node has 1 (gpusPerNode)" in error
    assert 'executor is "mp"' in error


def test_the_same_model_with_ray_spans_nodes() -> None:
    docs = render(sets=["models.qwq-32b.enabled=true", "engine.gpusPerNode=1"])
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "RayCluster"] == ["qwen-qwen-serve-qwq-32b"]


def test_uneven_split_over_nodes_is_refused(tmp_path: Path) -> None:
    from deploy.chart import values_snippet

    override = values_file(tmp_path, yaml.safe_load(values_snippet("qwq-32b", ["parallelism.tensor=3"])))
    error = render_error([override], sets=["engine.gpusPerNode=2"])
    assert "models.qwq-32b: tensor 3 x pipeline 1 = 3 GPUs do not split evenly over nodes of 2 GPUs" in error


def test_replicas_of_a_multi_node_model_are_refused() -> None:
    error = render_error(sets=["models.qwq-32b.enabled=true", "engine.gpusPerNode=1", "models.qwq-32b.replicas=2"])
    assert "models.qwq-32b: replicas 2: a multi-node model" in error


def test_unknown_top_level_key_is_refused() -> None:
    error = render_error(sets=["models.qwq-32b.enabled=true", "modelcache.size=1Ti"])
    assert "additional properties 'modelcache' not allowed" in error


def test_unknown_second_level_key_is_refused() -> None:
    error = render_error(sets=["models.qwq-32b.enabled=true", "engine.gpuPerNode=2"])
    assert "additional properties 'gpuPerNode' not allowed" in error


def test_no_model_enabled_is_refused() -> None:
    error = render_error()
    assert "no model is enabled: set models.<profile>.enabled=true for one of:" in error


def test_override_block_under_the_wrong_model_is_refused(tmp_path: Path) -> None:
    from deploy.chart import values_snippet

    block = yaml.safe_load(values_snippet("qwq-32b", []))["models"]["qwq-32b"]
    values = values_file(tmp_path, {"models": {"qwq-32b-short": block}})
    error = render_error([values])
    assert 'models.qwq-32b-short.profileOverride is the block of profile "qwq-32b"' in error


@pytest.mark.parametrize(("path", "accepted"), [
    ("/v1/embeddings", True), ("/v1/audio/transcriptions", True), ("/v1/a.b/c_d-e", True), ("/v1//x", True),
    ("/v1/", True), ("/v1", False), ("/v2/x", False), ("v1/x", False), ("/v1/x?y=1", False), ("/v1/x#y", False),
    ("/v1/%2e%2e/x", False), ("/v1/a b", False), ("/v1/a\\b", False), ("/v1/../admin", False),
    ("/v1/.well-known", False), ("/v1/x/.", False),
])
def test_forward_paths_are_refused_as_the_proxy_refuses_them(tmp_path: Path, path: str, accepted: bool) -> None:
    """The schema's pattern for proxy.forwardPaths accepts exactly the paths serving/config.py accepts."""
    try:
        ProxyConfig.model_validate({"models": [{"profile": "qwq-32b", "backends": ["http://h:8000"]}],
                                    "forward_paths": [path]})
        proxy_accepts = True
    except ValidationError:
        proxy_accepts = False
    assert proxy_accepts == accepted
    values = values_file(tmp_path, {"models": {"qwq-32b": {"enabled": True}},
                                    "proxy": {"forwardPaths": ["/v1/embeddings", path]}})
    result = run_helm(*template_args([values], []))
    if accepted:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0 and "/proxy/forwardPaths/1" in result.stderr, result.stderr


def _proxy_accepts_trusted(value: str) -> bool:
    try:
        ProxyConfig.model_validate({"models": [{"profile": "qwq-32b", "backends": ["http://h:8000"]}],
                                    "limits": {"trusted_proxies": [value]}})
    except ValidationError:
        return False
    return True


TRUSTED_PATTERN = re.compile(json.loads((CHART_DIR / "values.schema.json").read_text())["properties"]["proxy"][
    "properties"]["limits"]["properties"]["trustedProxies"]["items"]["pattern"])


@pytest.mark.parametrize(("value", "accepted"), [
    ("10.244.0.0/16", True), ("10.0.0.0/8", True), ("192.168.1.7", True), ("0.0.0.0/0", True),
    ("10.1.2.3/8", True), ("255.255.255.255/32", True), ("fd00::/8", True), ("::1", True), ("::/0", True),
    ("2001:db8::1/128", True), ("2001:DB8:0:0:0:0:0:1", True), ("1:2:3:4:5:6:7::", True), ("::2:3:4:5:6:7:8", True),
    ("256.0.0.1", False), ("10.0.0.0/33", False), ("10.0.0", False), ("10.0.0.0/", False), ("fd00::/129", False),
    ("ingress-nginx", False), ("", False), (" 10.0.0.0/8", False), ("10.0.0.0/8\n", False), ("1:2:3:4:5:6:7:8:9", False),
    ("2001:db8:::1", False), ("010.0.0.1", False), ("10.0.0.1-10.0.0.9", False), ("*", False),
])
def test_trusted_proxies_are_refused_where_the_proxy_refuses_them(tmp_path: Path, value: str, accepted: bool) -> None:
    """proxy.limits.trustedProxies: the schema and serving/config.py agree on common values and mistakes."""
    assert _proxy_accepts_trusted(value) == accepted
    values = values_file(tmp_path, {"models": {"qwq-32b": {"enabled": True}},
                                    "proxy": {"limits": {"trustedProxies": ["10.0.0.0/8", value]}}})
    result = run_helm(*template_args([values], []))
    if accepted:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0 and "/proxy/limits/trustedProxies/1" in result.stderr, result.stderr


@settings(max_examples=2000, deadline=None)
@given(st.from_regex(TRUSTED_PATTERN, fullmatch=True))
def test_every_trusted_proxy_the_schema_accepts_the_proxy_accepts(value: str) -> None:
    """The chart never installs a value the proxy would refuse at start (a crash loop). It refuses a few
    the proxy takes (netmask notation such as 10.0.0.0/255.0.0.0, zero-padded prefixes, embedded IPv4)."""
    assert _proxy_accepts_trusted(value), value


@pytest.mark.parametrize(("sets", "message"), [
    (["proxy.retries.maxAttempts=0"], "/proxy/retries/maxAttempts"),
    (["proxy.retries.maxAttempts=11"], "/proxy/retries/maxAttempts"),
    (["proxy.retries.attempts=2"], "additional properties 'attempts' not allowed"),
    (["proxy.forwardPaths=/v1/embeddings"], "/proxy/forwardPaths"),
    (["models.qwq-32b.hubIdName=yes"], "/models/qwq-32b/hubIdName"),
    (["proxy.timeouts.responseSeconds=0"], "/proxy/timeouts/responseSeconds"),
    (["proxy.timeouts.response_seconds=60"], "additional properties 'response_seconds' not allowed"),
    (["proxy.outlierEjection.consecutiveFailures=-1"], "/proxy/outlierEjection/consecutiveFailures"),
    (["proxy.outlierEjection.maxEjectedPercent=101"], "/proxy/outlierEjection/maxEjectedPercent"),
    (["proxy.outlierEjection.baseEjectionSeconds=0"], "/proxy/outlierEjection/baseEjectionSeconds"),
    (["proxy.outlierEjection.maxEjectionSeconds=0"], "/proxy/outlierEjection/maxEjectionSeconds"),
    (["proxy.outlierEjection.interval=10"], "additional properties 'interval' not allowed"),
    (["proxy.limits.trustedProxies=10.0.0.0/8"], "/proxy/limits/trustedProxies"),
])
def test_bad_proxy_values_are_refused_by_the_schema(sets: list[str], message: str) -> None:
    error = render_error(sets=["models.qwq-32b.enabled=true", *sets])
    assert "values don't meet the specifications of the schema" in error
    assert message in error
