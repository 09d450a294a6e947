"""LoRA adapters through the proxy: each adapter is a model name, answered by the base model's
backends under its own name, with its own sampling preset and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy.paths import REPO_ROOT
from serving.config import ConfigError, ProxyConfig, build_routes
from tests.conftest import RunningServer, Service, start_proxy, start_scripted_upstream

PROFILE = "tiny-qwen3-lora"
ADAPTER = "tiny-lora"
PROMPT = "Once upon a time"


def test_an_adapter_is_a_route_to_the_base_models_backends() -> None:
    routes = build_routes(ProxyConfig.model_validate(
        {"models": [{"profile": PROFILE, "backends": ["http://127.0.0.1:1"]}]}))
    assert sorted(routes) == ["tiny", "tiny-lora", "tiny-qwen3"]
    adapter, base = routes[ADAPTER], routes["tiny-qwen3"]
    assert adapter.served_name == ADAPTER  # vLLM serves the adapter under its own name
    assert adapter.entry is base.entry  # the same backends
    assert adapter.adapter is not None and adapter.adapter.source == ".cache/models/tiny-lora"
    assert adapter.sampling.defaults.temperature == 1.0 and base.sampling.defaults.temperature == 0.7


def test_an_adapter_named_like_another_models_name_is_refused() -> None:
    # tiny-qwen3-lora's base is served as tiny-qwen3 (alias tiny), as tiny-qwen3.yaml's is.
    with pytest.raises(ConfigError, match=r"models\[1\]: model name 'tiny-qwen3' is already served"):
        build_routes(ProxyConfig.model_validate({"models": [
            {"profile": "tiny-qwen3", "backends": ["http://127.0.0.1:1"]},
            {"profile": PROFILE, "backends": ["http://127.0.0.1:2"]}]}))


def test_an_adapter_named_like_another_profiles_model_is_refused(tiny_lora_dir: Path, tmp_path: Path) -> None:
    profile = yaml.safe_load((REPO_ROOT / "configs" / "models" / f"{PROFILE}.yaml").read_text())
    profile.update(name="clash", served_model_name="tiny-other", aliases=[])
    profile["lora"]["adapters"][0]["name"] = "tiny"  # tiny-qwen3's alias
    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(ConfigError, match=r"models\[1\]: LoRA adapter 'tiny' \(profile 'clash', lora.adapters\) "
                                          r"is already a model name of profile 'tiny-qwen3': rename the adapter"):
        build_routes(ProxyConfig.model_validate({"models": [
            {"profile": "tiny-qwen3", "backends": ["http://127.0.0.1:1"]},
            {"profile": str(path), "backends": ["http://127.0.0.1:2"]}]}))


# ---- through the proxy, against a scripted upstream ------------------------------------------

@pytest.fixture(scope="module")
def scripted(tiny_lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log_dir = tmp_path_factory.mktemp("lora-scripted")
    backend = start_scripted_upstream(log_dir)
    proxy = start_proxy(["--backend", f"{PROFILE}={backend.base_url}"], log_dir)
    yield proxy
    proxy.stop()
    backend.stop()


def chat(service: Service, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{service.base_url}/v1/chat/completions", json=body, timeout=30)


def test_the_adapter_gets_its_own_preset(scripted: Service) -> None:
    adapter, base = chat(scripted, ADAPTER), chat(scripted, "tiny-qwen3")
    assert adapter.status_code == base.status_code == 200
    assert adapter.headers["x-qwen-defaults-applied"] == "temperature,top_p,max_tokens"
    assert base.headers["x-qwen-defaults-applied"] == "temperature,top_p,top_k,min_p,max_tokens"


def test_models_lists_the_adapter_with_its_base(scripted: Service) -> None:
    listing = {m["id"]: m for m in httpx.get(f"{scripted.base_url}/v1/models", timeout=10).json()["data"]}
    assert listing[ADAPTER]["parent"] == "tiny-qwen3" and listing[ADAPTER]["root"] == ".cache/models/tiny-lora"
    assert listing["tiny-qwen3"]["parent"] is None


def test_an_unknown_adapter_is_a_404_naming_the_known_models(scripted: Service) -> None:
    response = chat(scripted, "tiny-lora-2")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "tiny-lora-2" in error["message"]
    assert "known models: tiny, tiny-lora, tiny-qwen3" in error["message"]


def test_metrics_are_labelled_by_adapter_name(scripted: Service) -> None:
    assert chat(scripted, ADAPTER, stream=True).status_code == 200
    text = httpx.get(f"{scripted.base_url}/metrics", timeout=10).text
    models = {sample.labels.get("model") for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == "qwen_proxy_requests_total"}
    ttft = {sample.labels["model"] for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "qwen_proxy_time_to_first_token_seconds_count"}
    assert ADAPTER in models and ADAPTER in ttft


# ---- through the proxy, against vLLM serving the adapter --------------------------------------

@pytest.fixture(scope="module")
def lora_proxy(lora_vllm_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_proxy(["--backend", f"{PROFILE}={lora_vllm_server.base_url}"],
                          tmp_path_factory.mktemp("lora-proxy"))
    yield service
    service.stop()


@pytest.mark.e2e
def test_vllm_applies_the_adapter_asked_for_by_name(lora_proxy: Service) -> None:
    client = openai.OpenAI(base_url=f"{lora_proxy.base_url}/v1", api_key="unused")

    def sample(model: str) -> str:
        # The same seed and sampling for both: only the adapter's weights can make them differ.
        done = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=1.0,
                                         seed=1234, extra_body={"top_k": -1, "min_p": 0.0, "ignore_eos": True})
        assert done.model == model and done.usage is not None and done.usage.completion_tokens == 16
        return done.choices[0].text

    base, adapted = sample("tiny-qwen3"), sample(ADAPTER)
    assert sample("tiny-qwen3") == base  # the seed makes each repeatable, so a difference is the adapter
    assert adapted != base


def test_vllms_runtime_lora_loading_is_not_reachable(scripted: Service) -> None:
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        response = httpx.post(f"{scripted.base_url}{path}", json={"lora_name": "x", "lora_path": "/tmp"}, timeout=10)
        assert response.status_code == 404 and "no such endpoint" in response.json()["error"]["message"]
