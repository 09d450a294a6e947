"""API keys, body size and rate limits: OpenAI-shaped refusals; keys never logged."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service

pytestmark = pytest.mark.e2e

KEY = "sk-test-5f1c0e9a"
BODY = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


@pytest.fixture
def guarded(proxy: Callable[..., Service], upstream: Callable[..., Service], tmp_path: Path) -> Service:
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\nsk-other\n")
    backend = upstream()
    return proxy({"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}],
                  "auth": {"api_keys_file": str(keys)},
                  "limits": {"max_body_bytes": 2048, "requests_per_minute_per_key": 3}})


def chat(service: Service, key: str | None, body: object = BODY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{service.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_keys(guarded: Service) -> None:
    missing = chat(guarded, None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert chat(guarded, "sk-wrong").status_code == 401
    assert chat(guarded, KEY).status_code == 200
    assert httpx.get(f"{guarded.base_url}/health").status_code == 200  # probes need no key
    assert KEY not in guarded.log() and "sk-wrong" not in guarded.log()


def test_body_limit(guarded: Service) -> None:
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
    response = chat(guarded, KEY, big)
    assert response.status_code == 413 and "exceeds the limit of 2048 bytes" in response.json()["error"]["message"]


def test_rate_limit_per_key(guarded: Service) -> None:
    statuses = [chat(guarded, KEY).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = chat(guarded, KEY)
    assert int(limited.headers["retry-after"]) >= 1
    assert chat(guarded, "sk-other").status_code == 200  # another key has its own budget


def test_keys_from_environment(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    os.environ["QWEN_TEST_KEYS"] = f"a,{KEY}"
    try:
        service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [upstream().base_url]}],
                         "auth": {"api_keys_env": "QWEN_TEST_KEYS"}})
    finally:
        del os.environ["QWEN_TEST_KEYS"]
    assert chat(service, KEY).status_code == 200 and chat(service, "b").status_code == 401
