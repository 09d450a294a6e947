"""SGLang profiles in the chart: SGLang's image and server, the same probes, shm and GPUs as vLLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.chart import chart_profiles, values_snippet
from deploy.loader import load_profile
from deploy.paths import REPO_ROOT
from serving.config import build_routes, load_config
from tests.k8s.chart import container, is_custom, one, render, render_error, validate_core, validate_custom
from tests.k8s.test_chart_engine import deploy_render

SGLANG_PROFILES = sorted(name for name, block in chart_profiles()[0].items() if block["engine"] == "sglang")
SGLANG_IMAGE = "lmsysorg/sglang:v0.5.23"
GPU = "nvidia.com/gpu"


def deployment(docs: list[dict[str, Any]], profile: str) -> dict[str, Any]:
    found: dict[str, Any] = one(docs, "Deployment", f"qwen-qwen-serve-{profile}")
    return found


def sglang(docs: list[dict[str, Any]], profile: str) -> dict[str, Any]:
    return container(deployment(docs, profile)["spec"]["template"], "sglang")


@pytest.fixture(scope="module")
def sglang_docs() -> list[dict[str, Any]]:
    """Every shipped SGLang profile at once (each has its own served name; the hub ids stay theirs)."""
    return render(sets=[f"models.{name}.enabled=true" for name in SGLANG_PROFILES]
                  + ["engine.autoscaling.serverAddress=http://prometheus.monitoring.svc:9090",
                     "engine.autoscaling.enabled=true", "models.qwq-32b-sglang.hubIdName=true"])


def test_the_sglang_pin_is_the_images_default() -> None:
    """values.yaml's SGLang image is the version deploy/sglang-requirements.txt pins for `deploy check`."""
    from deploy.engines.sglang_check import pinned_version

    values = yaml.safe_load((REPO_ROOT / "k8s" / "qwen-serve" / "values.yaml").read_text())
    assert values["engine"]["images"]["sglang"]["tag"] == f"v{pinned_version()}"
    assert f"{values['engine']['images']['sglang']['repository']}:v{pinned_version()}" == SGLANG_IMAGE


def test_shipped_sglang_profiles_are_in_the_chart() -> None:
    assert SGLANG_PROFILES == ["qwen3-4b-instruct-fp8-sglang", "qwen3-4b-thinking-fp8-sglang", "qwq-32b-sglang"]


def test_every_rendered_object_validates(sglang_docs: list[dict[str, Any]]) -> None:
    failures = []
    for doc in sglang_docs:
        try:
            validate_custom(doc) if is_custom(doc) else validate_core(doc)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
            failures.append(f"{doc['kind']} {doc['metadata']['name']}: {str(exc)[:800]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("profile", SGLANG_PROFILES)
def test_sglang_runs_the_rendered_argv_with_its_image(sglang_docs: list[dict[str, Any]], profile: str) -> None:
    template = deployment(sglang_docs, profile)["spec"]["template"]
    server = container(template, "sglang")
    rendered = deploy_render(profile)
    assert server["image"] == SGLANG_IMAGE
    assert server["command"] == ["python3", "-m", "sglang.launch_server"]
    assert server["args"] == rendered["argv"]
    assert server["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert server["args"][server["args"].index("--port") + 1] == "8000"
    assert server["args"][server["args"].index("--host") + 1] == "0.0.0.0"
    # The init containers run the same image (it carries `hf`), not the vLLM one.
    assert {c["image"] for c in template["spec"]["initContainers"]} == {SGLANG_IMAGE}
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["HOME"] == "/tmp"  # uid 1000 has no home in SGLang's image
    assert env["HF_HOME"] == "/models/hf" and env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("profile", SGLANG_PROFILES)
def test_gpus_shm_and_probes_as_for_vllm(sglang_docs: list[dict[str, Any]], profile: str) -> None:
    template = deployment(sglang_docs, profile)["spec"]["template"]
    server = container(template, "sglang")
    args = server["args"]
    gpus = int(args[args.index("--tp-size") + 1]) * int(args[args.index("--pp-size") + 1])
    assert gpus == load_profile(profile).parallelism.world_size
    assert server["resources"]["requests"][GPU] == server["resources"]["limits"][GPU] == gpus
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/models/hf"]]["persistentVolumeClaim"]["claimName"] == "qwen-qwen-serve-model-cache"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[kind]["httpGet"] == {"path": "/health", "port": "http"}, kind
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 1800


def test_qwq_on_sglang_holds_two_gpus_in_one_pod(sglang_docs: list[dict[str, Any]]) -> None:
    server = sglang(sglang_docs, "qwq-32b-sglang")
    assert server["resources"]["limits"][GPU] == 2
    assert not [d for d in sglang_docs if d["kind"] == "RayCluster"]  # SGLang never spans pods


def test_keda_scales_sglang_on_its_own_queue_gauge(sglang_docs: list[dict[str, Any]]) -> None:
    scaled = one(sglang_docs, "ScaledObject", "qwen-qwen-serve-qwen3-4b-instruct-fp8-sglang")
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["metadata"]["query"] == \
        'sum(sglang:num_queue_reqs{namespace="llm",model_name="qwen3-4b-instruct-sglang"})'


def test_proxy_routes_to_the_sglang_engines(sglang_docs: list[dict[str, Any]], tmp_path: Path) -> None:
    from tests.k8s.test_chart_profiles import _load_rendered_proxy_config

    routes = build_routes(load_config(_load_rendered_proxy_config(sglang_docs, tmp_path)))
    for profile in SGLANG_PROFILES:
        served = load_profile(profile).served_model_name
        assert routes[served].profile.engine == "sglang"
        assert routes[served].entry.backends == [f"http://qwen-qwen-serve-{profile}-headless.llm.svc:8000"]


def test_both_engines_side_by_side_each_with_its_image() -> None:
    docs = render(sets=["models.qwen3-4b-instruct-fp8.enabled=true", "models.qwen3-4b-instruct-fp8-sglang.enabled=true",
                        "models.qwen3-4b-instruct-fp8.hubIdName=true", "engine.images.vllm.tag=0.32.0-custom"])
    vllm = container(deployment(docs, "qwen3-4b-instruct-fp8")["spec"]["template"], "vllm")
    assert vllm["image"] == "qwen-serve/engine:0.32.0-custom"  # images.engine's repository, the tag set here
    assert vllm["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert sglang(docs, "qwen3-4b-instruct-fp8-sglang")["image"] == SGLANG_IMAGE


def test_sglang_image_is_set_per_model_or_for_all() -> None:
    docs = render(sets=["models.qwen3-4b-instruct-fp8-sglang.enabled=true", "models.qwq-32b-sglang.enabled=true",
                        "engine.images.sglang.tag=v0.5.23-cu129",
                        "models.qwq-32b-sglang.engine.images.sglang.repository=registry.example.com/sglang",
                        "models.qwq-32b-sglang.engine.images.sglang.pullPolicy=Always"])
    assert sglang(docs, "qwen3-4b-instruct-fp8-sglang")["image"] == "lmsysorg/sglang:v0.5.23-cu129"
    qwq = sglang(docs, "qwq-32b-sglang")
    assert (qwq["image"], qwq["imagePullPolicy"]) == ("registry.example.com/sglang:v0.5.23-cu129", "Always")


def test_sglang_without_an_image_tag_is_refused() -> None:
    error = render_error(sets=["models.qwen3-4b-instruct-fp8-sglang.enabled=true", "engine.images.sglang.tag="])
    assert ("models.qwen3-4b-instruct-fp8-sglang: profile engine sglang needs an image: set "
            "engine.images.sglang.repository and .tag (e.g. lmsysorg/sglang, v0.5.23).") in error


def test_sglang_beyond_one_node_is_refused() -> None:
    error = render_error(sets=["models.qwq-32b-sglang.enabled=true", "engine.gpusPerNode=1"])
    assert ("models.qwq-32b-sglang: tensor 2 x pipeline 1 = 2 GPUs, but a node has 1 (gpusPerNode), and an "
            "SGLang profile runs in one pod (the kit renders no multi-node SGLang).") in error


def test_schema_knows_the_engines(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"engine": {"images": {"tgi": {"repository": "x", "tag": "1"}}},
                                      "models": {"qwq-32b-sglang": {"enabled": True}}}))
    error = render_error([values])
    assert "/engine/images" in error and "tgi" in error
    block = yaml.safe_load(values_snippet("qwen3-4b-instruct-fp8-sglang", []))
    block["models"]["qwen3-4b-instruct-fp8-sglang"]["profileOverride"]["engine"] = "tgi"
    values.write_text(yaml.safe_dump(block))
    error = render_error([values])
    assert "/models/qwen3-4b-instruct-fp8-sglang/profileOverride/engine" in error


def test_sglang_lora_paths_name_the_adapter_where_the_pod_has_it(tmp_path: Path) -> None:
    """The LoRA test profile on SGLang: --lora-paths entries ({lora_name, lora_path}) as for vLLM's modules."""
    from tests.k8s.test_chart_lora import HUB, HUB_SOURCE, LOCAL, NAME, PROFILE

    values = tmp_path / "lora.yaml"
    values.write_text(values_snippet(str(PROFILE), ["engine=sglang"]))
    server = sglang(render([values]), NAME)
    args = server["args"]
    start = args.index("--lora-paths") + 1
    entries = {}
    for item in args[start:]:
        if item.startswith("--"):
            break
        entry = json.loads(item)
        entries[entry["lora_name"]] = entry["lora_path"]
    assert entries == {LOCAL: f"/models/hf/adapters/{LOCAL}", HUB: HUB_SOURCE}


def test_notes_say_which_models_run_on_sglang() -> None:
    from deploy.chart import CHART_DIR
    from tests.k8s.chart import run_helm

    result = run_helm("install", "qwen", str(CHART_DIR), "--dry-run=client", "--namespace", "llm",
                      "--set", "models.qwq-32b-sglang.enabled=true", "--set", "models.qwq-32b.enabled=true",
                      "--set", "models.qwq-32b.hubIdName=true")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "qwq-32b-sglang: profile qwq-32b-sglang, Qwen/QwQ-32B on SGLang, 1 pod(s) x 2 GPU(s)" in notes
    assert "profile qwq-32b, Qwen/QwQ-32B, 1 pod(s) x 2 GPU(s)" in notes
