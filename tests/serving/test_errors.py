"""Every error in OpenAI's shape with a clear message; bad input never gets a 5xx."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.paths import MODELS_DIR
from tests.conftest import Service, free_port

pytestmark = pytest.mark.e2e


def post(service: Service, body: object, path: str = "/v1/chat/completions", **kw: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(service.base_url + path, content=content, timeout=30,
                      headers={"content-type": "application/json"}, **kw)  # type: ignore[arg-type]


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]  # type: ignore[no-any-return]


def test_invalid_json(proxy_server: Service) -> None:
    response = post(proxy_server, b"{not json")
    assert response.status_code == 400 and "not valid JSON" in str(error_of(response)["message"])


def test_wrong_type_names_the_field(proxy_server: Service) -> None:
    response = post(proxy_server, {"model": "tiny", "messages": [], "temperature": "hot"})
    assert response.status_code == 400 and error_of(response)["param"] == "temperature"


def test_missing_and_unknown_model_list_known_models(proxy_server: Service) -> None:
    missing = post(proxy_server, {"messages": []})
    assert missing.status_code == 400 and "known models: tiny, tiny-qwen3" in str(error_of(missing)["message"])
    unknown = post(proxy_server, {"model": "gpt-5", "messages": []})
    assert unknown.status_code == 404 and "'gpt-5' does not exist" in str(error_of(unknown)["message"])


def test_unknown_v1_path_without_model_is_404(proxy_server: Service) -> None:
    assert httpx.post(f"{proxy_server.base_url}/v1/nothing", json={}, timeout=10).status_code == 404
    assert httpx.get(f"{proxy_server.base_url}/v2/x", timeout=10).status_code == 404


def test_unsupported_parameter_is_refused(proxy_server: Service) -> None:
    response = post(proxy_server, {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                   "enable_search": True})
    assert response.status_code == 400 and "enable_search" in str(error_of(response)["message"])


def test_no_healthy_backend_is_503(proxy: Callable[..., Service]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = {"models": [{"profile": "tiny-qwen3", "backends": [dead]}]}
    path_service = proxy(config)
    response = post(path_service, {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 503 and "no healthy backend for model 'tiny-qwen3'" in str(error_of(response)["message"])
    ready = httpx.get(f"{path_service.base_url}/ready")  # the proxy can serve: the model's outage is its own
    assert ready.status_code == 200 and ready.json()["models"]["tiny-qwen3"]["backends"] == {dead: "down"}
    assert httpx.get(f"{path_service.base_url}/health").status_code == 200


def greedy_profile(tmp_path: Path, policy: str) -> Path:
    data = yaml.safe_load((MODELS_DIR / "tiny-qwen3.yaml").read_text())
    data["name"] = f"greedy-{policy}"
    data["served_model_name"] = f"greedy-{policy}"
    data["aliases"] = []
    data["sampling"]["greedy"] = policy
    path = tmp_path / f"greedy-{policy}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_greedy_policies(proxy: Callable[..., Service], upstream: Callable[..., Service], tmp_path: Path) -> None:
    backend = upstream()
    service = proxy({"models": [
        {"profile": str(greedy_profile(tmp_path, "reject")), "backends": [backend.base_url]},
        {"profile": str(greedy_profile(tmp_path, "warn")), "backends": [backend.base_url]},
    ]})
    messages = [{"role": "user", "content": "x"}]
    rejected = post(service, {"model": "greedy-reject", "messages": messages, "temperature": 0})
    assert rejected.status_code == 400 and error_of(rejected)["code"] == "greedy_decoding_refused"
    warned = post(service, {"model": "greedy-warn", "messages": messages, "temperature": 0, "max_tokens": 2})
    assert warned.status_code == 200 and "greedy" in warned.headers["x-qwen-warning"]
    metrics = httpx.get(f"{service.base_url}/metrics").text
    assert 'qwen_proxy_greedy_requests_total{action="rejected",model="greedy-reject"} 1.0' in metrics
    assert 'qwen_proxy_greedy_requests_total{action="warned",model="greedy-warn"} 1.0' in metrics


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "stream", "stream_options", "temperature", "top_p", "top_k",
          "max_tokens", "max_completion_tokens", "stop", "chat_template_kwargs", "enable_thinking",
          "enable_search", "incremental_output", "result_format", "n", "seed"]
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=8).map(
        lambda d: {**d, "model": d.get("model", "tiny")}),
    JSON_VALUES,
    st.binary(max_size=64),
)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A proxy in front of a scripted upstream: bad input must be refused by the proxy itself."""
    from tests.conftest import start_proxy, start_scripted_upstream

    log_dir = tmp_path_factory.mktemp("fuzz")
    backend = start_scripted_upstream(log_dir)
    service = start_proxy(["--backend", f"tiny-qwen3={backend.base_url}"], log_dir)
    yield service
    service.stop()
    backend.stop()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/other"]))
def test_fuzzed_bodies_never_get_a_5xx(fuzz_target: Service, body: object, path: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(fuzz_target.base_url + path, content=content, timeout=30)
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and path != "/v1/embeddings":  # the backend's own answer
        error_of(response)
    assert httpx.get(f"{fuzz_target.base_url}/health").status_code == 200
