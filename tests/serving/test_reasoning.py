"""Reasoning output from real vLLM (deepseek_r1 parser) reaches Qwen clients as reasoning_content."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Service, free_port, start_proxy, start_service

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reasoning_proxy(tiny_model_dir: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A second vLLM: the reasoning parser is server-wide, so it cannot share the session's."""
    log_dir = tmp_path_factory.mktemp("reasoning")
    port = free_port()
    vllm = start_service([sys.executable, "-m", "deploy", "serve", "tiny-qwen3", "--port", str(port),
                          "--set", "reasoning_parser=deepseek_r1"], port, "/health", log_dir, timeout=300)
    proxy = start_proxy(["--backend", f"tiny-qwen3=http://127.0.0.1:{port}"], log_dir)
    yield proxy
    proxy.stop()
    vllm.stop(signal.SIGINT, timeout=60)


BODY = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "think"}], "max_tokens": 8}


def test_message_carries_reasoning_content(reasoning_proxy: Service) -> None:
    message = httpx.post(f"{reasoning_proxy.base_url}/v1/chat/completions", json=BODY, timeout=60).json()[
        "choices"][0]["message"]
    assert message["reasoning"]  # the tiny model never closes </think>: all of it is reasoning
    assert message["reasoning_content"] == message["reasoning"]


def test_stream_deltas_carry_reasoning_content(reasoning_proxy: Service) -> None:
    deltas = []
    with httpx.stream("POST", f"{reasoning_proxy.base_url}/v1/chat/completions",
                      json={**BODY, "stream": True, "enable_thinking": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                deltas.append(json.loads(line[6:])["choices"][0]["delta"])
    with_reasoning = [d for d in deltas if d.get("reasoning")]
    assert with_reasoning and all(d["reasoning_content"] == d["reasoning"] for d in with_reasoning)
