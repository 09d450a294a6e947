"""Real vLLM on the CPU (tiny model), started through the launcher, used with the openai client."""

from __future__ import annotations

import urllib.request

import httpx
import openai
import pytest

from tests.conftest import RunningServer, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(vllm_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm_server.base_url}/v1", api_key="unused")


def test_chat_completion(client: openai.OpenAI, vllm_server: RunningServer) -> None:
    response = client.chat.completions.create(
        model=vllm_server.profile.served_model_name,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=12,
    )
    choice = response.choices[0]
    assert response.model == "tiny-qwen3"
    assert choice.finish_reason == "length"  # random weights never pick the stop token in 12 steps
    assert isinstance(choice.message.content, str) and choice.message.content
    assert response.usage is not None
    assert response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_streamed_chat_completion(client: openai.OpenAI, vllm_server: RunningServer) -> None:
    stream = client.chat.completions.create(
        model="tiny-qwen3", messages=[{"role": "user", "content": "Count"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 <= len(text_chunks) <= 8
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens == 8


def test_stream_wire_format(vllm_server: RunningServer) -> None:
    """What the openai client hides: the content type, SSE framing and the final [DONE]."""
    body = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{vllm_server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3


def test_access_log_keeps_requests_but_not_health_and_metrics_polls(client: openai.OpenAI,
                                                                   vllm_server: RunningServer) -> None:
    """The launcher polled /health until vLLM was up, and the proxy and Prometheus poll /health and
    /metrics every few seconds: none of that is in vLLM's access log, every request still is."""
    for path in ("/health", "/metrics"):
        with urllib.request.urlopen(vllm_server.base_url + path, timeout=10) as response:
            assert response.status == 200
    client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    logged = '"POST /v1/chat/completions HTTP/1.1" 200'
    wait_until(lambda: logged in vllm_server.log_tail(100_000), 30, "the request in vLLM's access log")
    log = vllm_server.log_tail(100_000)
    assert '"GET /health HTTP/1.1"' not in log and '"GET /metrics HTTP/1.1"' not in log
