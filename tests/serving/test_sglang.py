"""The proxy in front of SGLang's OpenAI server (a scripted upstream shaped by SGLang 0.5.23's own
protocol models: SGLang cannot serve on this CPU): clients get what they get from vLLM."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from deploy.loader import load_profile
from tests.conftest import Service, start_proxy, start_scripted_upstream

PROFILE = "qwen3-4b-thinking-fp8-sglang"


@pytest.fixture(scope="module")
def sglang(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    log_dir = tmp_path_factory.mktemp("sglang")
    backend = start_scripted_upstream(log_dir, engine="sglang")
    proxy = start_proxy(["--backend", f"{PROFILE}={backend.base_url}"], log_dir)
    yield proxy, backend
    proxy.stop()
    backend.stop()


@pytest.fixture(scope="module")
def model() -> str:
    profile = load_profile(PROFILE)
    assert profile.engine == "sglang"
    return profile.served_model_name


def stats(backend: Service) -> dict[str, object]:
    data: dict[str, object] = httpx.get(f"{backend.base_url}/stats", timeout=10).json()
    return data


def reasoning_tokens(proxy: Service, model: str) -> float:
    sample = f'qwen_proxy_reasoning_tokens_total{{model="{model}"}} '
    lines = httpx.get(f"{proxy.base_url}/metrics", timeout=10).text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(sample)), 0.0)


def test_streamed_reasoning_comes_under_both_names(sglang: tuple[Service, Service], model: str) -> None:
    proxy, _ = sglang
    client = openai.OpenAI(base_url=f"{proxy.base_url}/v1", api_key="unused")
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
        extra_body={"script": "reasoning=2"}))
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    thoughts = [d for d in deltas if d.get("reasoning_content")]
    assert len(thoughts) == 2 and all(d["reasoning"] == d["reasoning_content"] == " tok" for d in thoughts)
    assert "".join(d["content"] or "" for d in deltas) == " tok" * 4
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage: SGLang's usage chunk dropped


def test_whole_answer_reasoning_under_both_names_and_usage_counted(sglang: tuple[Service, Service],
                                                                   model: str) -> None:
    proxy, _ = sglang
    before = reasoning_tokens(proxy, model)
    response = httpx.post(f"{proxy.base_url}/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "script": "reasoning=3"})
    message = response.json()["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == " hmm" * 3 and message["content"] == " tok" * 2
    assert reasoning_tokens(proxy, model) == before + 3  # SGLang's usage, read


def test_history_reasoning_reaches_sglang_as_reasoning_content(sglang: tuple[Service, Service], model: str) -> None:
    proxy, backend = sglang
    messages = [{"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1", "reasoning": "thought one"},  # as vLLM-style APIs return it
                {"role": "assistant", "content": "a2", "reasoning_content": "thought two"},
                {"role": "user", "content": "q2"}]
    response = httpx.post(f"{proxy.base_url}/v1/chat/completions", timeout=30,
                          json={"model": model, "messages": messages, "max_tokens": 2})
    assert response.status_code == 200
    assistants = stats(backend)["assistants"]
    assert isinstance(assistants, list)
    assert assistants[-1] == [{"reasoning_content": "thought one"}, {"reasoning_content": "thought two"}]


def test_sglang_errors_reach_clients_in_openais_shape(sglang: tuple[Service, Service], model: str) -> None:
    proxy, _ = sglang
    client = openai.OpenAI(base_url=f"{proxy.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"script": "reject"})
    assert raised.value.status_code == 400
    body = raised.value.body
    assert isinstance(body, dict) and body["message"] == "a validation error, as the engine answers it"
    raw = httpx.post(f"{proxy.base_url}/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "script": "reject"})
    assert json.loads(raw.content) == {"error": {"message": "a validation error, as the engine answers it",
                                                 "type": "Bad Request", "param": None, "code": 400}}
