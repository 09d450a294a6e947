"""The proxy's OpenAPI description: a valid OpenAPI 3.1 document (openapi-spec-validator), the same as
the copy in the repository, and true of what the running stack answers (schemathesis checks real
responses from vLLM through the proxy against it, and fuzzes the proxy's own answers)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate

from deploy.paths import REPO_ROOT
from serving.openapi import spec_json
from tests.conftest import Service, start_proxy, start_scripted_upstream

pytestmark = pytest.mark.e2e

COPY = REPO_ROOT / "serving" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(COPY)


def test_the_copy_in_the_repository_is_current_and_valid() -> None:
    assert COPY.read_bytes() == spec_json(), "regenerate it: python -m serving.openapi > serving/openapi.json"
    validate(json.loads(COPY.read_bytes()))


def test_the_served_description_is_valid_and_the_same(proxy_server: Service) -> None:
    response = httpx.get(f"{proxy_server.base_url}/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    validate(response.json())
    assert response.content == COPY.read_bytes()  # the default forward paths


def conforms(response: httpx.Response, path: str, method: str) -> None:
    SCHEMA[path][method].validate_response(response)  # raises, naming what does not conform


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/v1/models", None, 200),
    ("POST", "/v1/chat/completions", CHAT, 200),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, 200),
    ("POST", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2, "n": 2}, 200),
    ("POST", "/v1/completions", {"model": "tiny-qwen3", "prompt": "Once", "max_tokens": 2}, 200),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 5000}, 400),  # vLLM's own error, passed on
    ("POST", "/v1/chat/completions", {**CHAT, "model": "gpt-5"}, 404),
    ("POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400),
    ("GET", "/health", None, 200),
    ("GET", "/ready", None, 200),
    ("GET", "/metrics", None, 200),
    ("GET", "/openapi.json", None, 200),
])
def test_real_answers_conform(proxy_server: Service, method: str, path: str, body: dict[str, Any] | None,
                              status: int) -> None:
    response = httpx.request(method, proxy_server.base_url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    conforms(response, path, method)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The proxy in front of a scripted upstream: generated requests get fast answers."""
    log_dir = tmp_path_factory.mktemp("openapi")
    backend = start_scripted_upstream(log_dir)
    proxy = start_proxy(["--backend", f"tiny-qwen3={backend.base_url}"], log_dir)
    yield proxy
    proxy.stop()
    backend.stop()


@SCHEMA.include(path_regex="^/v1/(chat/completions|completions|models)$").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_answers_that_conform(case: schemathesis.Case[Any], fuzzed: Service) -> None:
    tokens = case.body.get("max_tokens") if isinstance(case.body, dict) else None
    if isinstance(case.body, dict) and isinstance(tokens, int):
        case.body["max_tokens"] = min(tokens, 8)  # the scripted upstream streams as many
    response = case.call(base_url=fuzzed.base_url, timeout=30)
    assert response.status_code < 500, response.text
    case.validate_response(response)


def test_the_docs_name_every_qwen_field() -> None:
    fields = json.loads(COPY.read_bytes())["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"top_k", "min_p", "repetition_penalty", "enable_thinking", "chat_template_kwargs", "stop",
            "stop_token_ids"} <= set(fields)


def test_the_error_shape_is_documented_for_every_refusal() -> None:
    spec = json.loads(COPY.read_bytes())
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/ready":  # its 503 is the readiness body
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)
