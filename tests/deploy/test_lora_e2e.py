"""vLLM's CPU build serving the tiny model and its LoRA adapter (tiny-qwen3-lora), started through
the launcher as `make serve-vllm MODEL=tiny-qwen3-lora` does, asked directly (no proxy)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.e2e


def chat(server: RunningServer, model: str, seed: int = 1, max_tokens: int = 32) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": max_tokens,
        "temperature": 1.0, "top_p": 1.0, "seed": seed, "logprobs": True, "return_tokens_as_token_ids": True,
    })


def sampled(server: RunningServer, model: str) -> tuple[list[str], list[float]]:
    """Token ids and their logprobs, as vLLM sampled them."""
    response = chat(server, model)
    assert response.status_code == 200, response.text
    content: list[dict[str, Any]] = response.json()["choices"][0]["logprobs"]["content"]
    return [t["token"] for t in content], [t["logprob"] for t in content]


def test_both_names_are_listed(lora_vllm_server: RunningServer) -> None:
    models = {m["id"]: m for m in httpx.get(f"{lora_vllm_server.base_url}/v1/models", timeout=10).json()["data"]}
    assert set(models) == {"tiny-qwen3", "tiny-lora"}
    assert models["tiny-lora"]["parent"] == "tiny-qwen3"
    assert models["tiny-lora"]["root"].endswith(".cache/models/tiny-lora")


def test_the_adapter_answers(lora_vllm_server: RunningServer) -> None:
    response = chat(lora_vllm_server, "tiny-lora", max_tokens=12)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-lora" and body["usage"]["completion_tokens"] == 12


def test_the_adapter_changes_what_is_sampled(lora_vllm_server: RunningServer) -> None:
    """Same prompt, seed and temperature 1.0: each model repeats itself exactly, and the two differ,
    so the difference is the adapter, not sampling noise."""
    base_tokens, base_logprobs = sampled(lora_vllm_server, "tiny-qwen3")
    lora_tokens, lora_logprobs = sampled(lora_vllm_server, "tiny-lora")
    assert sampled(lora_vllm_server, "tiny-qwen3") == (base_tokens, base_logprobs)
    assert sampled(lora_vllm_server, "tiny-lora") == (lora_tokens, lora_logprobs)
    assert len(base_tokens) == len(lora_tokens) == 32
    assert base_tokens != lora_tokens
    assert base_logprobs[0] != lora_logprobs[0]  # the first distribution already differs


def test_an_unknown_adapter_is_vllms_404(lora_vllm_server: RunningServer) -> None:
    response = chat(lora_vllm_server, "tiny-lora-v2", max_tokens=4)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["message"].startswith("The model `tiny-lora-v2` does not exist.")
    assert error["type"] == "NotFoundError"


def test_the_launcher_says_how_to_reach_the_adapter(lora_vllm_server: RunningServer) -> None:
    log = lora_vllm_server.log_path.read_text(errors="replace")
    assert "Loaded new LoRA adapter: name 'tiny-lora'" in log
    assert "(model name: tiny-qwen3; LoRA adapters: tiny-lora (send one as the model name))" in log
