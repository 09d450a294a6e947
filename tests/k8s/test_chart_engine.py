"""What matters in the rendered engines and proxy: GPUs, shm, probes, args, network, secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.chart import chart_profiles
from deploy.paths import REPO_ROOT
from tests.k8s.chart import container, engine_pods, objects, one, render

GPU = "nvidia.com/gpu"
SHIPPED_GPU_PROFILES = sorted(chart_profiles()[0])


def deploy_render(profile: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """What `python -m deploy render <profile> --port 8000 --json` prints, run as a user would."""
    argv = [sys.executable, "-m", "deploy", "render", profile, "--port", "8000", "--json"]
    for item in overrides or []:
        argv += ["--set", item]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def vllm_container(pod: dict[str, Any]) -> dict[str, Any]:
    """The engine's container: vLLM's (ray-head/ray-worker in a RayCluster) or SGLang's."""
    return next(c for c in pod["spec"]["containers"] if c["name"] in ("vllm", "sglang", "ray-head", "ray-worker"))


def flag(args: list[str], name: str) -> int:
    return int(args[args.index(name) + 1])


def hub_id_claims() -> list[str]:
    """Of the shipped profiles sharing a hub id (a model on vLLM and on SGLang, the two QwQ
    contexts), the first by name answers to it: with all enabled the proxy would not start otherwise."""
    blocks = chart_profiles()[0]
    by_hub: dict[str, list[str]] = {}
    for name in SHIPPED_GPU_PROFILES:
        by_hub.setdefault(blocks[name]["model"], []).append(name)
    return [f"models.{names[0]}.hubIdName=true" for names in by_hub.values() if len(names) > 1]


@pytest.fixture(scope="module")
def all_gpu_profiles() -> list[dict[str, Any]]:
    """Every shipped GPU profile enabled at once, on 8-GPU nodes."""
    return render(sets=[*(f"models.{name}.enabled=true" for name in SHIPPED_GPU_PROFILES), *hub_id_claims()])


# The server each engine's container runs the rendered argv with.
SERVER = {"vllm": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
          "sglang": ["python3", "-m", "sglang.launch_server"]}


@pytest.mark.parametrize("profile", SHIPPED_GPU_PROFILES)
def test_vllm_args_equal_deploy_render(all_gpu_profiles: list[dict[str, Any]], profile: str) -> None:
    """The engine container (named after the profile's engine) runs exactly `deploy render`'s argv."""
    from deploy.loader import load_profile

    engine = load_profile(profile).engine
    deployment = one(all_gpu_profiles, "Deployment", f"qwen-qwen-serve-{profile}")
    server = container(deployment["spec"]["template"], engine)
    rendered = deploy_render(profile)
    assert server["command"] == SERVER[engine]
    assert server["args"] == rendered["argv"]
    env = {e["name"]: e["value"] for e in server["env"] if "value" in e}
    assert rendered["env"].items() <= env.items()


def test_ray_head_args_equal_deploy_render_with_the_same_overrides() -> None:
    from tests.k8s.chart import render_example

    docs = render_example("qwq-32b-two-nodes-ray.yaml")
    [cluster] = objects(docs, "RayCluster")
    head = container(cluster["spec"]["headGroupSpec"]["template"], "ray-head")
    rendered = deploy_render("qwq-32b", ["parallelism.tensor=1", "parallelism.pipeline=2"])
    assert head["args"] == rendered["argv"]
    assert head["command"][-1] == "ray-head"  # bash -c script $0; the args are "$@"
    assert 'exec python3 -m vllm.entrypoints.openai.api_server "$@"' in head["command"][2]
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


def test_gpus_equal_tensor_times_pipeline(example: tuple[Path, list[dict[str, Any]]]) -> None:
    """Per model: requests = limits on every pod, and the pods together hold tensor x pipeline GPUs."""
    _, docs = example
    per_model: dict[str, list[int]] = {}
    world: dict[str, int] = {}
    for where, count, pod in engine_pods(docs):
        model = pod["metadata"]["labels"]["qwen-serve.io/model"]
        resources = vllm_container(pod)["resources"]
        assert resources["requests"][GPU] == resources["limits"][GPU], where
        per_model.setdefault(model, []).extend([resources["limits"][GPU]] * count)
        args = vllm_container(pod).get("args")
        if args:
            world[model] = flag(args, "--tensor-parallel-size") * flag(args, "--pipeline-parallel-size")
    assert per_model, "no engine pod rendered"
    for model, gpus in per_model.items():
        assert sum(gpus) == world[model], f"{model}: pods hold {gpus} GPUs, tensor x pipeline = {world[model]}"
        assert len(set(gpus)) == 1, f"{model}: uneven GPUs per pod {gpus}"


def test_shm_is_a_memory_backed_volume_at_dev_shm(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    for where, _, pod in engine_pods(docs):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in vllm_container(pod)["volumeMounts"]}
        assert "/dev/shm" in mounts, where
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"], where


def test_model_cache_is_the_claim_with_hf_home(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    [claim] = objects(docs, "PersistentVolumeClaim")
    for where, _, pod in engine_pods(docs):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], where
        vllm = vllm_container(pod)
        env = {e["name"]: e.get("value") for e in vllm["env"]}
        mount = next(m["mountPath"] for m in vllm["volumeMounts"] if m["name"] == "model-cache")
        assert env["HF_HOME"] == mount, where
        [download] = pod["spec"]["initContainers"]
        assert download["command"][:2] == ["hf", "download"], where
        assert {"name": "HF_HOME", "value": mount} in download["env"], where


def test_engine_probes_use_the_configured_thresholds() -> None:
    docs = render(sets=["models.qwen3-4b-instruct-fp8.enabled=true",
                        "engine.startupProbe.failureThreshold=360", "engine.startupProbe.periodSeconds=5",
                        "engine.livenessProbe.failureThreshold=7", "engine.readinessProbe.periodSeconds=4"])
    vllm = container(one(docs, "Deployment", "qwen-qwen-serve-qwen3-4b-instruct-fp8")["spec"]["template"], "vllm")
    assert vllm["startupProbe"]["failureThreshold"] == 360 and vllm["startupProbe"]["periodSeconds"] == 5
    assert vllm["livenessProbe"]["failureThreshold"] == 7
    assert vllm["readinessProbe"]["periodSeconds"] == 4
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[kind]["httpGet"] == {"path": "/health", "port": "http"}


def test_default_startup_allows_a_65_gb_load() -> None:
    docs = render(sets=["models.qwq-32b.enabled=true"])
    probe = container(one(docs, "Deployment", "qwen-qwen-serve-qwq-32b")["spec"]["template"], "vllm")["startupProbe"]
    assert probe["failureThreshold"] * probe["periodSeconds"] >= 1800


def test_every_example_has_probes_on_vllm_and_proxy(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    for where, _, pod in engine_pods(docs):
        vllm = vllm_container(pod)
        if vllm["name"] == "ray-worker":
            continue  # no vLLM server on workers: KubeRay's own raylet probes apply
        assert vllm["startupProbe"]["httpGet"]["path"] == "/health", where
        assert vllm["startupProbe"]["failureThreshold"] * vllm["startupProbe"]["periodSeconds"] >= 600, where
        assert vllm["readinessProbe"]["httpGet"]["path"] == "/health", where
        assert vllm["livenessProbe"]["httpGet"]["path"] == "/health", where
    proxy = container(one(docs, "Deployment", "qwen-qwen-serve-proxy")["spec"]["template"], "proxy")
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/health"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "the chart's selectors use matchLabels only"
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def test_network_policy_admits_only_proxy_prometheus_and_ray_peers(
        example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    policies = objects(docs, "NetworkPolicy")
    proxy_labels = one(docs, "Deployment", "qwen-qwen-serve-proxy")["spec"]["template"]["metadata"]["labels"]
    for where, _, pod in engine_pods(docs):
        labels = pod["metadata"]["labels"]
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert selecting, f"no NetworkPolicy selects {where}"
        sources = [peer for p in selecting for rule in p["spec"]["ingress"] for peer in rule["from"]]
        assert any(_selects(s.get("podSelector", {}), proxy_labels) and "namespaceSelector" not in s
                   for s in sources), f"{where}: the proxy is not admitted"
        assert any("namespaceSelector" in s for s in sources), f"{where}: Prometheus is not admitted"
        for source in sources:
            if "namespaceSelector" in source:
                continue
            admitted_proxy = _selects(source["podSelector"], proxy_labels)
            same_model_peer = (labels.get("qwen-serve.io/ray-node")
                               and _selects(source["podSelector"], labels)
                               and source["podSelector"]["matchLabels"].get("qwen-serve.io/model")
                               == labels["qwen-serve.io/model"])
            assert admitted_proxy or same_model_peer, f"{where}: unexpected ingress source {source}"


def test_no_secret_values_in_the_chart(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    assert not objects(docs, "Secret"), "the chart must reference Secrets, never create them"
    for doc in docs:
        template = doc.get("spec", {}).get("template") or doc.get("spec", {}).get("headGroupSpec", {}).get("template")
        pods = [template] if template else []
        pods += [g["template"] for g in doc.get("spec", {}).get("workerGroupSpecs", [])]
        for pod in pods:
            for c in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", []):
                for env in c.get("env", []):
                    if any(word in env["name"] for word in ("TOKEN", "KEY", "PASSWORD")):
                        assert "valueFrom" in env and "secretKeyRef" in env["valueFrom"], (doc["kind"], env)


def test_api_keys_and_hf_token_come_from_referenced_secrets() -> None:
    from tests.k8s.chart import render_example

    docs = render_example("all-models-one-proxy.yaml")
    proxy = container(one(docs, "Deployment", "qwen-qwen-serve-proxy")["spec"]["template"], "proxy")
    keys = next(e for e in proxy["env"] if e["name"] == "QWEN_PROXY_API_KEYS")
    assert keys["valueFrom"]["secretKeyRef"] == {"name": "qwen-proxy-keys", "key": "api-keys"}
    import yaml

    config = yaml.safe_load(one(docs, "ConfigMap", "qwen-qwen-serve-proxy")["data"]["proxy.yaml"])
    assert config["auth"]["api_keys_env"] == "QWEN_PROXY_API_KEYS"
    for where, _, pod in engine_pods(docs):
        token = next(e for e in pod["spec"]["initContainers"][0]["env"] if e["name"] == "HF_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}, where
        assert all(e["name"] != "HF_TOKEN" for e in vllm_container(pod)["env"]), f"{where}: vLLM needs no token"


def test_proxy_is_locked_down(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    pod = one(docs, "Deployment", "qwen-qwen-serve-proxy")["spec"]["template"]
    proxy = container(pod, "proxy")
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert proxy["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert proxy["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in proxy["volumeMounts"]
    assert proxy["command"] == ["python", "-m", "serving", "--config", "/etc/qwen-serve/proxy.yaml"]
    assert pod["spec"]["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"].items() \
        <= pod["metadata"]["labels"].items()


def test_engine_pods_are_locked_down_as_far_as_vllm_allows(example: tuple[Path, list[dict[str, Any]]]) -> None:
    _, docs = example
    for where, _, pod in engine_pods(docs):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, where
        assert pod["spec"]["automountServiceAccountToken"] is False, where
        context = vllm_container(pod)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], where


def test_services_route_to_vllm(example: tuple[Path, list[dict[str, Any]]]) -> None:
    """The proxy's backend per model is its headless Service's DNS name; that Service and the
    ClusterIP one select the same pods, those running vLLM (for Ray: the head only)."""
    from tests.k8s.chart import NAMESPACE

    _, docs = example
    import yaml

    config = yaml.safe_load(one(docs, "ConfigMap", "qwen-qwen-serve-proxy")["data"]["proxy.yaml"])
    for entry in config["models"]:
        [backend] = entry["backends"]
        host, port = backend.removeprefix("http://").rsplit(":", 1)
        name, namespace, svc = host.split(".")
        assert (namespace, svc, port) == (NAMESPACE, "svc", "8000"), backend
        headless = one(docs, "Service", name)
        assert headless["spec"]["clusterIP"] == "None", f"{name}: the proxy must resolve pods, not a virtual IP"
        assert headless["spec"]["publishNotReadyAddresses"] is False, f"{name}: unready pods must stay out of DNS"
        cluster_ip = one(docs, "Service", name.removesuffix("-headless"))
        assert cluster_ip["spec"]["type"] == "ClusterIP"
        assert headless["spec"]["selector"] == cluster_ip["spec"]["selector"]
        for service in (headless, cluster_ip):
            assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
            pods = [(where, pod) for where, _, pod in engine_pods(docs)
                    if service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()]
            assert pods, f"Service {service['metadata']['name']} selects no engine pod"
            for where, pod in pods:
                assert vllm_container(pod)["name"] in ("vllm", "ray-head"), f"{name} selects {where}"
                assert pod["metadata"]["labels"]["qwen-serve.io/model"] == headless["metadata"]["labels"][
                    "qwen-serve.io/model"], f"{name} selects another model's pod {where}"
