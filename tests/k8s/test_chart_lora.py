"""LoRA adapters in the chart: fetched or found on the model cache volume, named in vLLM's argv, routed by the proxy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.chart import chart_block, values_snippet
from deploy.loader import load_profile
from deploy.paths import REPO_ROOT, is_local
from serving.config import build_routes, load_config
from tests.k8s.chart import (
    container,
    engine_pods,
    is_custom,
    objects,
    one,
    render,
    render_error,
    validate_core,
    validate_custom,
)

# Test-only profile: qwen3-4b-support is a local directory, qwen3-4b-sql a hub id.
PROFILE = REPO_ROOT / "tests" / "deploy" / "profiles" / "qwen3-4b-instruct-fp8-lora.yaml"
NAME = "qwen3-4b-instruct-fp8-lora"
LOCAL, HUB = "qwen3-4b-support", "qwen3-4b-sql"
HUB_SOURCE = "example-org/qwen3-4b-instruct-sql-lora"
LOCAL_SOURCE = REPO_ROOT / "tests" / "deploy" / "adapters" / "qwen3-4b-instruct-support"
DEPLOYMENT = f"qwen-qwen-serve-{NAME}"


def lora_values(tmp_path: Path, overrides: list[str] | None = None) -> Path:
    """The values block `python -m deploy chart-profiles --profile <test profile> --values` prints."""
    path = tmp_path / "lora-values.yaml"
    path.write_text(values_snippet(str(PROFILE), overrides or []))
    return path


def pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    template: dict[str, Any] = one(docs, "Deployment", DEPLOYMENT)["spec"]["template"]
    return template


def init_container(pod_template: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_template["spec"].get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, [c["name"] for c in pod_template["spec"].get("initContainers", [])]
    return found[0]


def steps(adapters: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The adapters init container's (check|fetch, adapter, directory | hub id) triples."""
    args = adapters["args"]
    return [(args[i], args[i + 1], args[i + 2]) for i in range(0, len(args), 3)]


def lora_modules(args: list[str]) -> dict[str, dict[str, str]]:
    """--lora-modules entries (vLLM's JSON form) by adapter name."""
    start = args.index("--lora-modules") + 1
    modules = {}
    for item in args[start:]:
        if item.startswith("--"):
            break
        module = json.loads(item)
        modules[module["name"]] = module
    return modules


@pytest.fixture(scope="module")
def lora_docs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render([lora_values(tmp_path_factory.mktemp("lora"))])


def test_every_rendered_object_validates(lora_docs: list[dict[str, Any]]) -> None:
    failures = []
    for doc in lora_docs:
        try:
            validate_custom(doc) if is_custom(doc) else validate_core(doc)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
            failures.append(f"{doc['kind']} {doc['metadata']['name']}: {str(exc)[:800]}")
    assert not failures, "\n".join(failures)


def test_hub_adapter_is_downloaded_into_the_model_cache_after_the_model(lora_docs: list[dict[str, Any]]) -> None:
    template = pod(lora_docs)
    assert [c["name"] for c in template["spec"]["initContainers"]] == ["download", "adapters"]
    download, adapters = template["spec"]["initContainers"]
    assert ("fetch", HUB, HUB_SOURCE) in steps(adapters)
    assert 'hf download "$where"' in adapters["command"][2]
    # The same cache, HF_HOME and image as the model's download; vLLM reads HF_HOME too.
    vllm = container(template, "vllm")
    mount = next(m["mountPath"] for m in vllm["volumeMounts"] if m["name"] == "model-cache")
    for init in (download, adapters):
        assert {"name": "HF_HOME", "value": mount} in init["env"]
        assert {"name": "model-cache", "mountPath": mount} in init["volumeMounts"]
    assert adapters["image"] == download["image"] == vllm["image"]
    assert {"name": "HF_HOME", "value": mount} in vllm["env"]


def test_engine_args_name_each_adapter_where_the_pod_has_it(lora_docs: list[dict[str, Any]]) -> None:
    vllm = container(pod(lora_docs), "vllm")
    rendered = chart_block(load_profile(PROFILE))["args"]
    modules = lora_modules(vllm["args"])
    assert set(modules) == {LOCAL, HUB}
    # The local adapter: its directory on the model cache volume, not the path where render ran.
    assert modules[LOCAL] == {"name": LOCAL, "path": "/models/hf/adapters/qwen3-4b-support",
                              "base_model_name": "qwen3-4b-instruct"}
    assert str(LOCAL_SOURCE) in json.dumps(lora_modules(rendered)[LOCAL])
    # The hub adapter keeps its hub id: vLLM resolves it in HF_HOME, where the init container put it.
    assert modules[HUB] == {"name": HUB, "path": HUB_SOURCE, "base_model_name": "qwen3-4b-instruct"}
    # Everything else is the rendered argv, in its order.
    local_index = next(i for i, a in enumerate(rendered) if a.startswith("{") and f'"{LOCAL}"' in a)
    assert vllm["args"][:local_index] + vllm["args"][local_index + 1:] == \
        rendered[:local_index] + rendered[local_index + 1:]
    for flag, value in (("--max-lora-rank", "16"), ("--max-loras", "2"), ("--max-cpu-loras", "4")):
        assert vllm["args"][vllm["args"].index(flag) + 1] == value
    assert "--enable-lora" in vllm["args"]


def test_local_adapter_is_checked_on_the_cache_volume_vllm_mounts(lora_docs: list[dict[str, Any]]) -> None:
    template = pod(lora_docs)
    adapters = init_container(template, "adapters")
    directory = lora_modules(container(template, "vllm")["args"])[LOCAL]["path"]
    assert ("check", LOCAL, directory) in steps(adapters)
    mounts = {m["mountPath"]: m["name"] for m in container(template, "vllm")["volumeMounts"]}
    [volume] = [name for path, name in mounts.items() if directory.startswith(path + "/")]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    claim = volumes[volume]["persistentVolumeClaim"]["claimName"]
    assert claim == one(lora_docs, "PersistentVolumeClaim", "qwen-qwen-serve-model-cache")["metadata"]["name"]


def test_adapters_init_container_fails_on_a_missing_adapter_and_fetches_hub_ones(tmp_path: Path) -> None:
    """The init container's own script, run by /bin/sh with a stand-in `hf` that records its calls."""
    cache = tmp_path / "cache"
    docs = render([lora_values(tmp_path)], sets=[f"modelCache.mountPath={cache}"])
    template = pod(docs)
    adapters = init_container(template, "adapters")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "hf-calls"
    hf = bin_dir / "hf"
    hf.write_text(f'#!/bin/sh\necho "HF_HOME=$HF_HOME $*" >> {calls}\n')
    hf.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}",
           **{e["name"]: e["value"] for e in adapters["env"] if "value" in e}}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*adapters["command"], *adapters["args"]], env=env, capture_output=True, text=True,
                              timeout=30, check=False)

    missing = run()
    directory = cache / "adapters" / LOCAL
    assert missing.returncode == 1
    assert (f"error: LoRA adapter {LOCAL} of models.{NAME} (the profile's lora.adapters): no "
            f"{directory}/adapter_config.json on the model cache volume (claim qwen-qwen-serve-model-cache). "
            f"Copy the adapter's directory (adapter_config.json and its weights) to {directory}, or set "
            f"models.{NAME}.adapterPaths.{LOCAL} to the directory holding it, relative to {cache}.") in missing.stderr

    shutil.copytree(LOCAL_SOURCE, directory)
    present = run()
    assert present.returncode == 0, present.stderr
    assert calls.read_text().splitlines() == [f"HF_HOME={cache} download {HUB_SOURCE}"]
    module = lora_modules(container(template, "vllm")["args"])[LOCAL]
    assert (Path(module["path"]) / "adapter_config.json").is_file()


def test_the_chart_tells_local_adapters_from_hub_ids_by_the_profiles_rule(tmp_path: Path) -> None:
    """One local-path rule: the adapters the pods read from the cache volume are exactly those
    deploy/paths.py's is_local calls directories (the templates test the generated sources)."""
    sources = {"dot": "./tests/deploy/adapters/qwen3-4b-instruct-support", "abs": str(tmp_path / "absent"),
               "hub": "org/qwen3-4b-instruct-sql-lora"}
    adapters = ", ".join(f"{{name: {name}, source: '{source}'}}" for name, source in sources.items())
    overrides = [f"lora={{max_rank: 16, adapters: [{adapters}]}}"]
    template = pod(render([lora_values(tmp_path, overrides)]))
    modules = lora_modules(container(template, "vllm")["args"])
    lora = load_profile(PROFILE, overrides).lora
    assert lora is not None
    read_from_the_volume = {a.name: modules[a.name]["path"] == f"/models/hf/adapters/{a.name}" for a in lora.adapters}
    assert read_from_the_volume == {a.name: is_local(a.source) for a in lora.adapters} == {
        "dot": True, "abs": True, "hub": False}
    assert all((a.path is not None) == is_local(a.source) for a in lora.adapters)


def test_adapter_paths_point_at_a_directory_of_your_choice(tmp_path: Path) -> None:
    docs = render([lora_values(tmp_path)], sets=[f"models.{NAME}.adapterPaths.{LOCAL}=finetune/run-42/final",
                                                 f"models.{NAME}.adapterPaths.{HUB}=mirror/sql",
                                                 "modelCache.mountPath=/cache"])
    template = pod(docs)
    modules = lora_modules(container(template, "vllm")["args"])
    assert modules[LOCAL]["path"] == "/cache/finetune/run-42/final"
    assert modules[HUB]["path"] == "/cache/mirror/sql"  # a copy on the volume: not downloaded
    assert steps(init_container(template, "adapters")) == [("check", LOCAL, "/cache/finetune/run-42/final"),
                                                          ("check", HUB, "/cache/mirror/sql")]


def test_without_downloads_hub_adapters_come_from_the_cache_and_local_ones_are_still_checked(
        tmp_path: Path) -> None:
    template = pod(render([lora_values(tmp_path)], sets=["modelCache.download.enabled=false"]))
    assert [c["name"] for c in template["spec"]["initContainers"]] == ["adapters"]
    assert steps(template["spec"]["initContainers"][0]) == [("check", LOCAL, "/models/hf/adapters/qwen3-4b-support")]
    assert lora_modules(container(template, "vllm")["args"])[HUB]["path"] == HUB_SOURCE


def test_hub_token_reaches_the_adapter_download(tmp_path: Path) -> None:
    template = pod(render([lora_values(tmp_path)], sets=["huggingface.tokenSecretName=hf-token"]))
    token = next(e for e in init_container(template, "adapters")["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}


def test_a_profile_without_adapters_has_no_adapters_init_container() -> None:
    docs = render(sets=["models.qwen3-4b-instruct-fp8.enabled=true"])
    template = one(docs, "Deployment", "qwen-qwen-serve-qwen3-4b-instruct-fp8")["spec"]["template"]
    assert [c["name"] for c in template["spec"]["initContainers"]] == ["download"]
    assert "--enable-lora" not in container(template, "vllm")["args"]


def test_multi_node_adapters_reach_the_head_and_every_worker(tmp_path: Path) -> None:
    """vLLM's workers load adapter weights themselves: every Ray pod fetches/finds them."""
    values = lora_values(tmp_path, ["parallelism.pipeline=2", "parallelism.executor=ray"])
    docs = render([values], sets=["engine.gpusPerNode=1"])
    [cluster] = objects(docs, "RayCluster")
    validate_custom(cluster)
    pods = list(engine_pods(docs))
    assert len(pods) == 2
    for where, _, template in pods:
        assert ("fetch", HUB, HUB_SOURCE) in steps(init_container(template, "adapters")), where
    head = container(cluster["spec"]["headGroupSpec"]["template"], "ray-head")
    assert lora_modules(head["args"])[LOCAL]["path"] == "/models/hf/adapters/qwen3-4b-support"


def test_unknown_adapter_in_adapter_paths_names_the_profiles_adapters(tmp_path: Path) -> None:
    error = render_error([lora_values(tmp_path)], sets=[f"models.{NAME}.adapterPaths.qwen3-4b-chat=chat"])
    assert (f'models.{NAME}.adapterPaths.qwen3-4b-chat: profile {NAME} has no LoRA adapter "qwen3-4b-chat" '
            f"(its adapters: {LOCAL}, {HUB}).") in error
    error = render_error(sets=["models.qwen3-4b-instruct-fp8.enabled=true",
                               "models.qwen3-4b-instruct-fp8.adapterPaths.x=x"])
    assert "profile qwen3-4b-instruct-fp8 has no LoRA adapter \"x\" (it declares no lora: adapters)." in error


@pytest.mark.parametrize("path", ["/abs/dir", "../outside", "a/../../b", "a//b", "a b", ""])
def test_adapter_paths_stay_on_the_volume(tmp_path: Path, path: str) -> None:
    values = tmp_path / "paths.yaml"
    values.write_text(yaml.safe_dump({"models": {NAME: {"adapterPaths": {LOCAL: path}}}}))
    error = render_error([lora_values(tmp_path), values])
    assert f"/models/{NAME}/adapterPaths/{LOCAL}" in error and "does not match pattern" in error


def test_proxy_routes_each_adapter_to_the_base_models_backends(lora_docs: list[dict[str, Any]],
                                                               tmp_path: Path) -> None:
    from tests.k8s.test_chart_profiles import _load_rendered_proxy_config

    routes = build_routes(load_config(_load_rendered_proxy_config(lora_docs, tmp_path)))
    profile = load_profile(PROFILE)
    base = routes["qwen3-4b-instruct"]
    for name in (LOCAL, HUB):
        route = routes[name]
        assert route.adapter is not None and route.adapter.name == name
        assert route.served_name == name  # vLLM picks the adapter by the name the request keeps
        assert route.entry.backends == base.entry.backends == [f"http://{DEPLOYMENT}-headless.llm.svc:8000"]
    assert routes[LOCAL].sampling == profile.sampling_for(LOCAL) != base.sampling
    assert routes[HUB].sampling == base.sampling


def test_helm_test_asks_each_adapter_for_a_token(lora_docs: list[dict[str, Any]]) -> None:
    job = one(lora_docs, "Job", "qwen-qwen-serve-test-connection")
    env = {e["name"]: e.get("value") for e in container(job["spec"]["template"], "test-connection")["env"]}
    assert env["SERVED_NAMES"] == f"qwen3-4b-instruct,{HUB},{LOCAL}"


def test_notes_name_the_adapters_and_where_local_ones_go(tmp_path: Path) -> None:
    from deploy.chart import CHART_DIR
    from tests.k8s.chart import run_helm

    result = run_helm("install", "qwen", str(CHART_DIR), "--dry-run=client", "--namespace", "llm",
                      "-f", str(lora_values(tmp_path)))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert (f"LoRA adapter {LOCAL} (a model name too): read from the model cache volume at "
            "/models/hf/adapters/qwen3-4b-support") in notes
    assert f"LoRA adapter {HUB} (a model name too): hub id {HUB_SOURCE}, in the model cache (HF_HOME)" in notes
    assert "(claim qwen-qwen-serve-model-cache)" in notes
