"""Scale-out objects: a headless Service per model for the proxy's discovery, and the optional
KEDA ScaledObject per model Deployment (vLLM's queue from Prometheus)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.k8s.chart import (
    NAMESPACE,
    container,
    objects,
    one,
    render,
    render_error,
    validate_core,
    validate_custom,
)

INSTRUCT = "qwen3-4b-instruct-fp8"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
KEDA_ON = [f"models.{INSTRUCT}.enabled=true", "engine.autoscaling.enabled=true",
           f"engine.autoscaling.serverAddress={PROMETHEUS}"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        held = {"In": key in labels and labels[key] in values,
                "NotIn": key not in labels or labels[key] not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not held:
            return False
    return True


def test_headless_service_per_model_validates() -> None:
    docs = render(sets=[f"models.{INSTRUCT}.enabled=true", "models.qwq-32b-short.enabled=true"])
    headless = [s for s in objects(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert sorted(s["metadata"]["name"] for s in headless) == [
        f"qwen-qwen-serve-{INSTRUCT}-headless", "qwen-qwen-serve-qwq-32b-short-headless"]
    for service in headless:
        validate_core(service)
        model = service["metadata"]["labels"]["qwen-serve.io/model"]
        deployment = one(docs, "Deployment", f"qwen-qwen-serve-{model}")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["publishNotReadyAddresses"] is False


def test_headless_service_of_a_ray_model_selects_the_head_only() -> None:
    docs = render(sets=["models.qwq-32b.enabled=true", "engine.gpusPerNode=1"])
    service = one(docs, "Service", "qwen-qwen-serve-qwq-32b-headless")
    [cluster] = objects(docs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    workers = [g["template"]["metadata"]["labels"] for g in cluster["spec"]["workerGroupSpecs"]]
    assert service["spec"]["selector"].items() <= head.items()
    assert workers and not any(service["spec"]["selector"].items() <= w.items() for w in workers)


def test_engine_service_monitor_scrapes_each_engine_once() -> None:
    """The headless Service selects the same pods as the ClusterIP one: scraping both would double
    every vLLM series (and the queue KEDA sums)."""
    docs = render(sets=[f"models.{INSTRUCT}.enabled=true", "models.qwq-32b.enabled=true",
                        "monitoring.serviceMonitor.enabled=true"])
    monitor = one(docs, "ServiceMonitor", "qwen-qwen-serve-engine")
    validate_custom(monitor)
    scraped = sorted(s["metadata"]["name"] for s in objects(docs, "Service")
                     if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
                     and any(p["name"] == "http" for p in s["spec"]["ports"]))
    assert scraped == [f"qwen-qwen-serve-{INSTRUCT}", "qwen-qwen-serve-qwq-32b"]


def test_no_scaled_object_by_default_and_replicas_stay() -> None:
    docs = render(sets=[f"models.{INSTRUCT}.enabled=true", f"models.{INSTRUCT}.replicas=3"])
    assert not objects(docs, "ScaledObject")
    assert one(docs, "Deployment", f"qwen-qwen-serve-{INSTRUCT}")["spec"]["replicas"] == 3


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    values = tmp_path_factory.mktemp("values") / "values.yaml"  # a file: `--set` passes 2.5 as a string
    values.write_text(yaml.safe_dump({"engine": {"autoscaling": {"threshold": 2.5}}}))
    return render([values], sets=[*KEDA_ON, "engine.autoscaling.minReplicas=2", "engine.autoscaling.maxReplicas=6",
                                  "engine.autoscaling.pollingIntervalSeconds=10",
                                  "engine.autoscaling.cooldownSeconds=600", f"models.{INSTRUCT}.replicas=3"])


def test_scaled_object_matches_kedas_crd(scaled: list[dict[str, Any]]) -> None:
    [scaled_object] = objects(scaled, "ScaledObject")
    validate_custom(scaled_object)
    validate_core(one(scaled, "Deployment", f"qwen-qwen-serve-{INSTRUCT}"))


def test_kedas_crd_check_refuses_what_keda_would(scaled: list[dict[str, Any]]) -> None:
    """The CRD validation can fail: an unknown field, a trigger without metadata."""
    [scaled_object] = objects(scaled, "ScaledObject")
    unknown = copy.deepcopy(scaled_object)
    unknown["spec"]["replicas"] = 2
    with pytest.raises(AssertionError, match="'replicas' was unexpected"):
        validate_custom(unknown)
    no_metadata = copy.deepcopy(scaled_object)
    del no_metadata["spec"]["triggers"][0]["metadata"]
    with pytest.raises(AssertionError, match="'metadata' is a required property"):
        validate_custom(no_metadata)


def test_scaled_object_scales_the_models_deployment_on_its_queue(scaled: list[dict[str, Any]]) -> None:
    [scaled_object] = objects(scaled, "ScaledObject")
    deployment = one(scaled, "Deployment", f"qwen-qwen-serve-{INSTRUCT}")
    spec = scaled_object["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"]) == (2, 6, 10)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"] == 600
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["serverAddress"] == PROMETHEUS
    assert trigger["metadata"]["threshold"] == "2.5"
    # The query sums the queue of the pods this Deployment runs: vLLM labels its metrics with the
    # served name it was started with.
    args = container(deployment["spec"]["template"], "vllm")["args"]
    served = args[args.index("--served-model-name") + 1]
    assert trigger["metadata"]["query"] == (
        f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",model_name="{served}"}})')
    # KEDA's HPA owns the replica count: the Deployment must not reset it on every upgrade.
    assert "replicas" not in deployment["spec"]


def test_autoscaling_per_model_and_query_override() -> None:
    docs = render(sets=[f"models.{INSTRUCT}.enabled=true", "models.qwen3-4b-thinking-fp8.enabled=true",
                        f"models.{INSTRUCT}.engine.autoscaling.enabled=true",
                        f"models.{INSTRUCT}.engine.autoscaling.serverAddress={PROMETHEUS}",
                        f"models.{INSTRUCT}.engine.autoscaling.query=sum(my_queue)"])
    [scaled_object] = objects(docs, "ScaledObject")
    assert scaled_object["spec"]["scaleTargetRef"]["name"] == f"qwen-qwen-serve-{INSTRUCT}"
    assert scaled_object["spec"]["triggers"][0]["metadata"]["query"] == "sum(my_queue)"
    assert "replicas" not in one(docs, "Deployment", f"qwen-qwen-serve-{INSTRUCT}")["spec"]
    assert one(docs, "Deployment", "qwen-qwen-serve-qwen3-4b-thinking-fp8")["spec"]["replicas"] == 1


@pytest.mark.parametrize(("sets", "message"), [
    (["engine.autoscaling.minReplicas=0"], "/engine/autoscaling/minReplicas"),
    (["engine.autoscaling.threshold=0"], "/engine/autoscaling/threshold"),
    (["engine.autoscaling.cooldownSeconds=7200"], "/engine/autoscaling/cooldownSeconds"),
    (["engine.autoscaling.serverAddress=prometheus:9090"], "/engine/autoscaling/serverAddress"),
    (["engine.autoscaling.maxReplica=3"], "additional properties 'maxReplica' not allowed"),
    (["proxy.routing.policy=round_robin"], "/proxy/routing/policy"),
    (["proxy.routing.epsilon=0"], "/proxy/routing/epsilon"),
    (["proxy.routing.headroom=-1"], "/proxy/routing/headroom"),
    (["proxy.routing.sessionHeader=X-Session-Id"], "/proxy/routing/sessionHeader"),
    (["proxy.dnsRefreshSeconds=0"], "/proxy/dnsRefreshSeconds"),
])
def test_bad_scaling_and_routing_values_are_refused_by_the_schema(sets: list[str], message: str) -> None:
    error = render_error(sets=[*KEDA_ON, *sets])
    assert "values don't meet the specifications of the schema" in error
    assert message in error


def test_autoscaling_without_prometheus_is_refused() -> None:
    error = render_error(sets=[f"models.{INSTRUCT}.enabled=true", "engine.autoscaling.enabled=true"])
    assert (f"models.{INSTRUCT}: engine.autoscaling.enabled needs engine.autoscaling.serverAddress, "
            "the Prometheus KEDA queries") in error


def test_min_above_max_replicas_is_refused() -> None:
    error = render_error(sets=[*KEDA_ON, "engine.autoscaling.minReplicas=5", "engine.autoscaling.maxReplicas=2"])
    assert f"models.{INSTRUCT}: engine.autoscaling.minReplicas (5) is above maxReplicas (2)" in error


def test_autoscaling_a_ray_cluster_is_refused_with_the_way_out() -> None:
    error = render_error(sets=["models.qwq-32b.enabled=true", "engine.gpusPerNode=1",
                               "engine.autoscaling.enabled=true", f"engine.autoscaling.serverAddress={PROMETHEUS}"])
    assert "models.qwq-32b: engine.autoscaling is for models in one pod (a Deployment)" in error
    assert "Set models.qwq-32b.engine.autoscaling.enabled=false" in error
