"""The official openai client through the proxy, in front of real vLLM (tiny model, CPU)."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionStreamOptionsParam

from tests.conftest import RunningServer, Service

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(proxy_server: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy_server.base_url}/v1", api_key="unused", max_retries=0)


def sampling_at_backend(vllm_server: RunningServer, request_id: str) -> dict[str, str]:
    """The SamplingParams vLLM logged for a request: proof of what reached the backend."""
    for line in vllm_server.log_path.read_text(errors="replace").splitlines():
        if f"Received request {request_id}:" in line:
            params = re.search(r"SamplingParams\((.*?)\), lora_request", line)
            assert params is not None, line
            return dict(item.split("=", 1) for item in re.split(r", (?=\w+=)", params.group(1)))
    raise AssertionError(f"vLLM did not log request {request_id}")


def test_models_lists_names_and_aliases(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["tiny", "tiny-qwen3"]


def test_chat_with_alias_answers_in_the_alias_name(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert response.model == "tiny"
    assert response.usage is not None and response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length"


def test_completions(client: openai.OpenAI) -> None:
    response = client.completions.create(model="tiny-qwen3", prompt="Once upon", max_tokens=4)
    assert response.usage is not None and response.usage.completion_tokens == 4
    assert response.choices[0].text


@pytest.mark.parametrize("include_usage", [True, False])
def test_streaming_usage_only_when_asked(client: openai.OpenAI, include_usage: bool) -> None:
    options: ChatCompletionStreamOptionsParam | None = {"include_usage": True} if include_usage else None
    chunks = list(client.chat.completions.create(
        model="tiny-qwen3", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
        stream_options=options,
    ))
    usages = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert usages == ([6] if include_usage else [])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_streamed_completions_end_with_done(proxy_server: Service) -> None:
    body = {"model": "tiny-qwen3", "prompt": "a", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{proxy_server.base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and len(events) == 4


def test_profile_defaults_reach_vllm(proxy_server: Service, vllm_server: RunningServer) -> None:
    response = httpx.post(f"{proxy_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert response.status_code == 200
    assert response.headers["x-qwen-defaults-applied"] == "temperature,top_p,top_k,min_p"
    params = sampling_at_backend(vllm_server, response.json()["id"])
    defaults = vllm_server.profile.sampling.defaults
    assert float(params["temperature"]) == defaults.temperature
    assert float(params["top_p"]) == defaults.top_p
    assert int(params["top_k"]) == defaults.top_k


def test_explicit_values_reach_vllm_unchanged(proxy_server: Service, vllm_server: RunningServer) -> None:
    response = httpx.post(f"{proxy_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "temperature": 0.3, "top_p": 0.5, "top_k": 0, "seed": 7, "repetition_penalty": 1.1})
    assert response.status_code == 200
    assert response.headers.get("x-qwen-defaults-applied") == "min_p"
    params = sampling_at_backend(vllm_server, response.json()["id"])
    assert (float(params["temperature"]), float(params["top_p"]), int(params["top_k"])) == (0.3, 0.5, 0)
    assert (params["seed"], float(params["repetition_penalty"])) == ("7", 1.1)


def test_stop_token_ids_reach_vllm(proxy_server: Service, vllm_server: RunningServer) -> None:
    response = httpx.post(f"{proxy_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": [[5], 6]})
    assert response.status_code == 200
    assert sampling_at_backend(vllm_server, response.json()["id"])["stop_token_ids"] == "[5, 6]"


def test_backend_4xx_passes_through_unchanged(proxy_server: Service, vllm_server: RunningServer) -> None:
    body = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}
    direct = httpx.post(f"{vllm_server.base_url}/v1/chat/completions", json=body, timeout=60)
    proxied = httpx.post(f"{proxy_server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert direct.status_code == proxied.status_code == 400
    assert proxied.json() == direct.json()


def test_proxy_metrics_use_their_own_prefix(proxy_server: Service) -> None:
    text = httpx.get(f"{proxy_server.base_url}/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert names and all(name.startswith("qwen_proxy_") for name in names)
    assert 'qwen_proxy_completion_tokens_total{model="tiny-qwen3"}' in text
    assert 'qwen_proxy_defaults_applied_total{field="temperature",model="tiny-qwen3"}' in text
