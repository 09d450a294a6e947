"""A default that fits the backend: a max_tokens the proxy fills in from the profile is lowered to
the max_model_len the backend reports in /v1/models (else the engine refuses every request that
sends none); a client's own max_tokens is never changed (the engine's answer to it is the client's)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deploy.paths import MODELS_DIR
from tests.conftest import RunningServer, Service, free_port, start_service

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "x"}]
CAP_LOG = "reports max_model_len 2048, below the profile's default max_tokens 32768"


def scripted(services: list[Service], tmp_path: Path, *args: str) -> Service:
    port = free_port()
    service = start_service([sys.executable, "-m", "benchmarks.scripted_upstream", "--port", str(port), *args],
                            port, "/health", tmp_path)
    services.append(service)
    return service


def seen_max_tokens(backend: Service) -> list[Any]:
    return list(httpx.get(f"{backend.base_url}/stats", timeout=10).json()["max_tokens"])


def test_a_defaulted_max_tokens_is_lowered_to_the_backends_context(
        proxy: Callable[..., Service], services: list[Service], tmp_path: Path) -> None:
    """Issue 24: qwq-32b's default 32768 reached a backend started with --max-model-len 2048, which
    refused every request without max_tokens."""
    backend = scripted(services, tmp_path, "--max-model-len", "2048", "--served-model-name", "qwq-32b")
    service = proxy({"models": [{"profile": "qwq-32b", "backends": [backend.base_url]}]})
    url = f"{service.base_url}/v1/chat/completions"
    for _ in range(2):
        response = httpx.post(url, json={"model": "qwq", "messages": MESSAGES}, timeout=60)
        assert response.status_code == 200, response.text
        assert "max_tokens: the profile's default 32768 lowered to 2048" in response.headers["x-qwen-warning"]
    assert seen_max_tokens(backend) == [2048, 2048]
    assert service.log().count(CAP_LOG) == 1  # once per backend, not per request

    # The client's own max_tokens goes as sent, and the engine's refusal is the client's answer.
    mine = httpx.post(url, json={"model": "qwq", "messages": MESSAGES, "max_tokens": 4096}, timeout=60)
    assert mine.status_code == 400 and "max_model_len=2048" in mine.json()["error"]["message"]
    small = httpx.post(url, json={"model": "qwq", "messages": MESSAGES, "max_tokens": 3}, timeout=60)
    assert small.status_code == 200 and "x-qwen-warning" not in small.headers
    assert seen_max_tokens(backend)[2:] == [4096, 3]


def test_a_default_within_the_context_is_sent_as_it_is(proxy: Callable[..., Service], services: list[Service],
                                                       tmp_path: Path) -> None:
    backend = scripted(services, tmp_path, "--max-model-len", "40960", "--served-model-name", "qwq-32b")
    service = proxy({"models": [{"profile": "qwq-32b", "backends": [backend.base_url]}]})
    response = httpx.post(f"{service.base_url}/v1/chat/completions", json={"model": "qwq", "messages": MESSAGES},
                          timeout=60)
    assert response.status_code == 200 and seen_max_tokens(backend) == [32768]
    assert "x-qwen-warning" not in response.headers


def test_against_vllm_started_with_a_smaller_context(proxy: Callable[..., Service], vllm_server: RunningServer,
                                                     tmp_path: Path) -> None:
    """The session's vLLM serves tiny-qwen3 with max_model_len 2048 (and says so in /v1/models); the
    proxy's profile for it claims 32768 and defaults max_tokens to 32768, as a profile does whose
    server was started with a smaller --max-model-len."""
    profile = yaml.safe_load((MODELS_DIR / "tiny-qwen3.yaml").read_text())
    profile.update(name="tiny-long", aliases=[], max_model_len=32768)
    profile["sampling"]["defaults"]["max_tokens"] = 32768
    path = tmp_path / "tiny-long.yaml"
    path.write_text(yaml.safe_dump(profile))
    service = proxy({"models": [{"profile": str(path), "backends": [vllm_server.base_url]}]})
    response = httpx.post(f"{service.base_url}/v1/chat/completions", timeout=120,
                          json={"model": "tiny-qwen3", "messages": MESSAGES})
    assert response.status_code == 200, response.text  # vLLM refused max_tokens=32768 with a 400
    assert 0 < response.json()["usage"]["completion_tokens"] <= 2048
    assert "lowered to 2048" in response.headers["x-qwen-warning"]
