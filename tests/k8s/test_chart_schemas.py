"""The chart lints strictly and every rendered object matches Kubernetes' (or its CRD's) schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.chart import CHART_DIR
from tests.k8s.chart import (
    EXAMPLES,
    KUBERNETES_VERSION,
    is_custom,
    run_helm,
    validate_core,
    validate_custom,
)

EXPECTED_EXAMPLES = {
    "qwen3-4b-fp8-one-gpu", "qwq-32b-tp2-one-node", "qwq-32b-two-nodes-ray", "all-models-one-proxy",
}


def test_every_example_is_shipped() -> None:
    assert {p.stem for p in EXAMPLES} == EXPECTED_EXAMPLES


@pytest.mark.parametrize("values", EXAMPLES, ids=lambda p: p.stem)
def test_helm_lint_strict(values: Path) -> None:
    result = run_helm("lint", "--strict", str(CHART_DIR), "-f", str(values), "--kube-version", KUBERNETES_VERSION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_every_object_validates(example: tuple[Path, list[dict[str, Any]]]) -> None:
    """Core kinds: kubernetes-validate (strict) for KUBERNETES_VERSION; CRD kinds: the CRD schema."""
    _, docs = example
    failures = []
    for doc in docs:
        try:
            validate_custom(doc) if is_custom(doc) else validate_core(doc)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
            failures.append(f"{doc['kind']} {doc['metadata']['name']}: {str(exc)[:800]}")
    assert not failures, "\n".join(failures)


def test_custom_resources_are_covered() -> None:
    """The CRD kinds the chart can render are all exercised by the examples."""
    from tests.k8s.chart import render_example

    kinds = {d["kind"] for p in EXAMPLES for d in render_example(p.name) if is_custom(d)}
    assert kinds == {"RayCluster", "ServiceMonitor", "PrometheusRule", "ScaledObject"}


def test_names_fit_kubernetes_limits(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_notes_print_the_port_forward_and_a_first_request() -> None:
    # `helm install --dry-run=client` renders NOTES.txt without a cluster (`helm template` does not).
    result = run_helm("install", "qwen", str(CHART_DIR), "--dry-run=client", "--namespace", "llm",
                      "-f", str(CHART_DIR / "examples" / "qwq-32b-tp2-one-node.yaml"))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n llm port-forward svc/qwen-qwen-serve-proxy 8000:8000" in notes
    assert '"model": "qwq-32b"' in notes
    assert "get secret qwen-proxy-keys" in notes
    assert "helm test qwen -n llm" in notes


def test_helm_test_job_lists_models_and_asks_one_token() -> None:
    from tests.k8s.chart import container, one, render_example

    docs = render_example("all-models-one-proxy.yaml")
    job = one(docs, "Job", "qwen-qwen-serve-test-connection")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "test"
    test = container(job["spec"]["template"], "test-connection")
    script = test["command"][2]
    assert '"/v1/models"' in script and '"/v1/completions"' in script and '"max_tokens": 1' in script
    env = {e["name"]: e.get("value") for e in test["env"]}
    assert env["SERVED_NAMES"] == "qwen3-4b-instruct,qwen3-4b-thinking,qwq-32b"
    assert env["PROXY_URL"] == "http://qwen-qwen-serve-proxy:8000"


def _documented_keys(node: Any, schema: dict[str, Any], lines: list[str], path: str) -> Iterator[tuple[str, bool]]:
    """(key path, has a comment above or inline) for every key the schema declares."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return
    properties = schema.get("properties", {})
    for key_node, value_node in node.value:
        key = key_node.value
        child = properties.get(key)
        extra = schema.get("additionalProperties")
        if child is None and isinstance(extra, dict) and "properties" in extra:
            child = extra  # models.<profile>
        if child is None:
            continue  # a value inside a free-form map (labels, env...), not a chart key
        line = key_node.start_mark.line
        above = lines[line - 1].strip() if line else ""
        inline = " #" in lines[line]
        yield f"{path}{key}", above.startswith("#") or inline
        if "$ref" in child:
            child = SCHEMA["definitions"][child["$ref"].rsplit("/", 1)[1]]
        if child.get("description", "").startswith(("A Kubernetes", "Kubernetes")):
            continue  # a Kubernetes object (resources, LabelSelector): its fields are Kubernetes'
        yield from _documented_keys(value_node, child, lines, f"{path}{key}.")


SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


def test_every_values_key_has_a_comment() -> None:
    import yaml

    text = (CHART_DIR / "values.yaml").read_text()
    keys = list(_documented_keys(yaml.compose(text), SCHEMA, text.splitlines(), ""))
    assert len(keys) > 150
    undocumented = [key for key, documented in keys if not documented]
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"


def test_schema_closes_the_top_levels() -> None:
    assert SCHEMA["additionalProperties"] is False
    for name, child in SCHEMA["properties"].items():
        if child.get("type") == "object" and "properties" in child:
            assert child["additionalProperties"] is False, name
