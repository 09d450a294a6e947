"""What Qwen API clients send, through the proxy to real vLLM (tiny model, CPU): hub ids as model
names, reasoning sent back in the history, documented fields vLLM would drop silently."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from deploy.paths import MODELS_DIR
from tests.conftest import RunningServer, Service

pytestmark = pytest.mark.e2e

HUB_ID = "Qwen/QwQ-32B"


def hub_profile(tmp_path: Path) -> Path:
    """QwQ-32B's profile, served here by the tiny model: the same hub id and sampling, a small
    max_tokens default and a workload that fit the tiny context."""
    data = yaml.safe_load((MODELS_DIR / "qwq-32b.yaml").read_text())
    data.update(name="qwq-on-tiny", served_model_name="tiny-qwen3", aliases=[], max_model_len=2048,
                workload={"input": 1000, "output": 1000})
    data["sampling"]["defaults"]["max_tokens"] = 16
    path = tmp_path / "qwq-on-tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def hub_proxy(proxy: Callable[..., Service], vllm_server: RunningServer, tmp_path: Path) -> Service:
    return proxy({"models": [{"profile": str(hub_profile(tmp_path)), "backends": [vllm_server.base_url]}]})


def test_the_qwq_api_docs_request_works_unchanged(hub_proxy: Service) -> None:
    """As the QwQ-32B API docs show it: the hub id and messages, nothing else."""
    client = openai.OpenAI(base_url=f"{hub_proxy.base_url}/v1", api_key="unused", max_retries=0)
    response = client.chat.completions.with_raw_response.create(
        model=HUB_ID, messages=[{"role": "user", "content": "Which is larger, 9.9 or 9.11?"}])
    completion = response.parse()
    assert completion.model == HUB_ID
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert response.headers["x-qwen-defaults-applied"] == "temperature,top_p,top_k,min_p,max_tokens"
    assert HUB_ID in [model.id for model in client.models.list()]


@pytest.fixture(scope="module")
def tokens(vllm_server: RunningServer) -> Iterator[Callable[[list[dict[str, str]]], int]]:
    """The prompt length vLLM renders for a conversation (its /tokenize, with the chat template)."""
    with httpx.Client(base_url=vllm_server.base_url, timeout=60) as http:
        def count(messages: list[dict[str, str]]) -> int:
            response = http.post("/tokenize", json={"model": "tiny-qwen3", "messages": messages,
                                                    "add_generation_prompt": True})
            response.raise_for_status()
            return int(response.json()["count"])
        yield count


def prompt_tokens(base_url: str, messages: list[dict[str, str]]) -> int:
    response = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny-qwen3", "messages": messages, "max_tokens": 1})
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


def test_reasoning_content_in_the_history_reaches_the_prompt(
        proxy_server: Service, tokens: Callable[[list[dict[str, str]]], int]) -> None:
    """DashScope/DeepSeek clients send back the `reasoning_content` they received. Through the proxy
    it reaches the rendered prompt as `reasoning` (vLLM 0.32's chat request renames it; its
    /tokenize does not, so that is the reference here), which Qwen3's template keeps for the turns
    after the last user message. An explicit `reasoning` wins."""
    thought = "first I compare the integer parts, then the tenths"
    sent = [{"role": "user", "content": "9.9 or 9.11?"},
            {"role": "assistant", "content": "9.9", "reasoning_content": thought},
            {"role": "user", "content": "why?"}]
    as_reasoning = [sent[0], {"role": "assistant", "content": "9.9", "reasoning": thought}, sent[2]]
    without = [sent[0], {"role": "assistant", "content": "9.9"}, sent[2]]
    assert tokens(as_reasoning) > tokens(without)
    assert prompt_tokens(proxy_server.base_url, sent) == tokens(as_reasoning)
    explicit = [sent[0], {**sent[1], "reasoning": "explicit"}, sent[2]]
    assert prompt_tokens(proxy_server.base_url, explicit) == tokens(
        [sent[0], {"role": "assistant", "content": "9.9", "reasoning": "explicit"}, sent[2]])


def test_a_field_vllm_ignores_is_answered_with_a_warning(proxy_server: Service) -> None:
    """`prediction` is in the QwQ-32B API docs' parameter list; vLLM accepts it and drops it."""
    response = httpx.post(f"{proxy_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "prediction": {"type": "content", "content": "hello"}})
    assert response.status_code == 200
    assert "'prediction' is ignored by this deployment" in response.headers["x-qwen-warning"]
