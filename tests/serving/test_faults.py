"""Failures: backends dying, slow or stalled; clients leaving; retries; timeouts. (The drain on SIGTERM:
test_drain.py.)"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, Service, http_ok, start_scripted_upstream, wait_until

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "x"}]


def stats(backend: Service) -> dict[str, int]:
    return httpx.get(f"{backend.base_url}/stats", timeout=5).json()  # type: ignore[no-any-return]


def metric(service: Service, sample: str) -> float:
    for line in httpx.get(f"{service.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def vllm_sample(vllm: RunningServer, sample: tuple[str, str]) -> float:
    """The sum of vLLM's samples of a metric whose labels include `label="value"` ("" for any)."""
    name, label = sample
    text = httpx.get(vllm.metrics_url, timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line.split("}")[0])


RUNNING = ("vllm:num_requests_running", "")
GENERATED = ("vllm:generation_tokens_total", "")
FINISHED = ("vllm:request_success_total", "")  # vLLM 0.32 counts no aborted request here


def stream_events(service: Service, body: dict[str, object], actions: dict[int, Callable[[], object]]) -> list[str]:
    """Read a stream's SSE events, running actions[n] right after the n-th event arrives."""
    events: list[str] = []
    with httpx.stream("POST", f"{service.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line:
                events.append(line)
                if len(events) in actions:
                    actions[len(events)]()
    return events


def single(proxy: Callable[..., Service], backend: Service, **timeouts: float) -> Service:
    entry: dict[str, object] = {"profile": "tiny-qwen3", "backends": [backend.base_url]}
    if timeouts:
        entry["timeouts"] = timeouts
    return proxy({"models": [entry], "health_interval_seconds": 0.5, "drain_seconds": 20})


# ---- client disconnects abort the backend request ----------------------------------------------

async def _leave_once_running(url: str, body: dict[str, object], vllm: RunningServer, stream: bool) -> None:
    """Send a long request and leave as soon as vLLM is generating it."""
    async with httpx.AsyncClient(timeout=60) as client:
        if stream:
            # A token event is the proof it runs (vLLM's running gauge can lag a request that it
            # generates in seconds: seen reading 0 for a whole one).
            async with client.stream("POST", url, json=body) as response:
                async for line in response.aiter_lines():
                    if '"content":"' in line:
                        return  # leaving the block closes the connection mid-stream
            raise AssertionError("the stream ended before its first token")
        # vLLM's request log (enable-log-requests) is the proof it took the request.
        added = _logged(vllm, "Added request")
        task = asyncio.create_task(client.post(url, json=body))
        deadline = time.monotonic() + 60  # a failure bound only
        while await asyncio.to_thread(_logged, vllm, "Added request") == added:
            if task.done():
                raise AssertionError(f"the request ended before vLLM logged it: {task.result()}")
            assert time.monotonic() < deadline, "vLLM never logged the request"
        task.cancel()


def _logged(vllm: RunningServer, what: str) -> int:
    """How many of vLLM's log lines say `what` (its request log is on in the session's server)."""
    return vllm.log_path.read_text(errors="replace").count(what)


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "non-streaming"])
def test_client_leaving_aborts_vllm(proxy_server: Service, vllm_server: RunningServer, stream: bool) -> None:
    """vLLM's own log and counters prove it: it logs the abort, the request stops short of its 2 x 1,900 forced tokens (seconds
    of work on the CPU) and is never counted finished. Unaborted, it would run to its length."""
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 1900, "min_tokens": 1900, "n": 2,
            "stream": stream}
    generated, finished = vllm_sample(vllm_server, GENERATED), vllm_sample(vllm_server, FINISHED)
    aborted = _logged(vllm_server, "Aborted request")
    asyncio.run(_leave_once_running(f"{proxy_server.base_url}/v1/chat/completions", body, vllm_server, stream))
    wait_until(lambda: _logged(vllm_server, "Aborted request") > aborted, 60, "vLLM to log the abort")
    wait_until(lambda: vllm_sample(vllm_server, RUNNING) == 0, 60, "vLLM to run nothing")
    assert vllm_sample(vllm_server, FINISHED) == finished, "the request finished: nothing aborted it"
    assert vllm_sample(vllm_server, GENERATED) - generated < 2 * 1900


def test_client_leaving_before_first_token_closes_upstream(proxy: Callable[..., Service],
                                                            upstream: Callable[..., Service]) -> None:
    backend = upstream()
    service = single(proxy, backend)
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "stream": True}

    async def leave() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            # The upstream would wait an hour before its first byte: only the proxy closing the
            # request can end it now.
            task = asyncio.create_task(client.post(f"{service.base_url}/v1/chat/completions",
                                                   json={**body, "script": "first-byte-delay=3600"}))
            await asyncio.to_thread(wait_until, lambda: stats(backend)["in_flight"] == 1, 30,
                                    "the request to reach the upstream")
            task.cancel()

    asyncio.run(leave())
    wait_until(lambda: stats(backend)["disconnects"] == 1, 30, "the upstream request to be closed")
    assert stats(backend)["in_flight"] == 0


# ---- backend failures ----------------------------------------------------------------------------

def test_backend_killed_mid_stream(proxy: Callable[..., Service], tmp_path: Path) -> None:
    backend = start_scripted_upstream(tmp_path, delay_ms=50)
    service = single(proxy, backend)
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 200, "stream": True}
    try:
        events = stream_events(service, body, {3: lambda: backend.stop(signal.SIGKILL)})
    finally:
        backend.stop(signal.SIGKILL)
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_reset" and "incomplete" in error["message"]
    assert "data: [DONE]" not in events
    assert metric(service, 'qwen_proxy_upstream_errors_total{kind="reset",model="tiny-qwen3"}') == 1
    assert http_ok(f"{service.base_url}/health")

    short = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2}

    def seen(state: str) -> bool:
        ready = httpx.get(f"{service.base_url}/ready", timeout=10)
        return ready.status_code == 200 and ready.json()["models"]["tiny-qwen3"]["backends"][backend.base_url] == state

    wait_until(lambda: seen("down"), 5, "/ready to report the backend down")
    assert httpx.post(f"{service.base_url}/v1/chat/completions", json=short, timeout=10).status_code == 503
    revived = start_scripted_upstream(tmp_path, port=backend.port)
    try:
        wait_until(lambda: seen("up"), 10, "the backend to be seen again")
        assert httpx.post(f"{service.base_url}/v1/chat/completions", json=short, timeout=10).status_code == 200
    finally:
        revived.stop()


def test_connect_failure_is_retried_on_another_backend(proxy: Callable[..., Service],
                                                       upstream: Callable[..., Service]) -> None:
    first, second = upstream(), upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [first.base_url, second.base_url],
                                 "routing": "least_in_flight"}],  # the first request goes to the first
                     "health_interval_seconds": 3600})  # the proxy will not notice the death by itself
    first.stop(signal.SIGKILL)
    response = httpx.post(f"{service.base_url}/v1/chat/completions", timeout=10,
                          json={"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2})
    assert response.status_code == 200 and stats(second)["requests"] == 1
    assert metric(service, 'qwen_proxy_upstream_errors_total{kind="connect",model="tiny-qwen3"}') == 1


def test_a_backend_failing_after_reading_the_request_is_not_retried(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """The request may be what crashes it: one attempt, a clear 502, and health checks (not this
    failure) decide whether the backend is down. Before, 4 backends attempts were made."""
    crashing, other = upstream(), upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [crashing.base_url, other.base_url],
                                 "routing": "least_in_flight"}], "health_interval_seconds": 3600})
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2, "script": "close-before-response"}
    response = httpx.post(f"{service.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_reset"
    assert "model 'tiny-qwen3'" in error["message"] and "not retried" in error["message"]
    assert stats(crashing)["requests"] + stats(other)["requests"] == 1
    assert metric(service, 'qwen_proxy_upstream_errors_total{kind="reset",model="tiny-qwen3"}') == 1
    for backend in (crashing, other):
        assert metric(service, f'qwen_proxy_backend_up{{backend="{backend.base_url}",model="tiny-qwen3"}}') == 1
    assert http_ok(f"{service.base_url}/ready")


def test_a_backend_failing_on_a_reused_connection_gets_one_fresh_try(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """On a pooled connection the same failure may be the backend's idle close: one more try on a
    fresh connection, where it fails again, and that is all (2 attempts, never the other backend)."""
    crashing, other = upstream(), upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [crashing.base_url, other.base_url],
                                 "routing": "least_in_flight"}], "health_interval_seconds": 3600})
    url = f"{service.base_url}/v1/chat/completions"
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=30).status_code == 200  # the first backend: a pooled connection
    assert httpx.post(url, json=body, timeout=30).status_code == 200  # round-robin: the second, likewise
    response = httpx.post(url, json={**body, "script": "close-before-response"}, timeout=30)
    assert response.status_code == 502 and "not retried" in response.json()["error"]["message"]
    assert (stats(crashing)["requests"], stats(other)["requests"]) == (3, 1)
    assert stats(crashing)["connections"] == 2


def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """A pooled connection the backend closed before answering (its idle close racing our
    request) proves nothing was started: sent once more, on a new connection."""
    backend = upstream()
    service = single(proxy, backend)
    url = f"{service.base_url}/v1/chat/completions"
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=30).status_code == 200  # leaves a pooled connection
    retried = httpx.post(url, json={**body, "script": "close-if-reused"}, timeout=30)
    assert retried.status_code == 200 and retried.json()["usage"]["completion_tokens"] == 2
    assert stats(backend)["requests"] == 3 and stats(backend)["connections"] == 2
    assert metric(service, 'qwen_proxy_upstream_errors_total{kind="stale_connection",model="tiny-qwen3"}') == 1
    assert metric(service, f'qwen_proxy_backend_up{{backend="{backend.base_url}",model="tiny-qwen3"}}') == 1


def test_attempts_are_bounded(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """Refused connections move on to the next backend, up to retries.max_attempts in all."""
    backends = [upstream(), upstream(), upstream()]
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [b.base_url for b in backends],
                                 "routing": "least_in_flight"}],
                     "retries": {"max_attempts": 2}, "health_interval_seconds": 3600})
    for backend in backends:
        backend.stop(signal.SIGKILL)  # the proxy still takes all three for healthy
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2}
    response = httpx.post(f"{service.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "gave up after 2 attempts (retries.max_attempts; 2 refused the connection)" in message
    up = [metric(service, f'qwen_proxy_backend_up{{backend="{b.base_url}",model="tiny-qwen3"}}') for b in backends]
    assert sorted(up) == [0, 0, 1]
    assert metric(service, 'qwen_proxy_upstream_errors_total{kind="connect",model="tiny-qwen3"}') == 2


def test_fewest_requests_in_flight_wins(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    first, second = upstream(delay_ms=20), upstream(delay_ms=20)
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [first.base_url, second.base_url],
                                 "routing": "least_in_flight"}]})
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 20, "stream": True}

    async def four() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(*(client.post(f"{service.base_url}/v1/chat/completions", json=body)
                                   for _ in range(4)))

    asyncio.run(four())
    assert stats(first)["requests"] == stats(second)["requests"] == 2


def test_first_byte_timeout_is_504(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    service = single(proxy, upstream(), first_byte_seconds=0.5)
    response = httpx.post(f"{service.base_url}/v1/chat/completions", timeout=30,
                          json={"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2, "stream": True,
                                "script": "first-byte-delay=3600"})
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"
    assert "(timeouts.first_byte_seconds)" in response.json()["error"]["message"]


def test_a_whole_answer_slower_than_the_first_byte_bound_is_delivered(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """vLLM sends a non-streamed answer's head only once every token is generated: first_byte_seconds
    (meant for a stream's prefill) used to cut it (a 504 after the GPU did the work); its bound is
    response_seconds."""
    service = single(proxy, upstream(), first_byte_seconds=0.2, response_seconds=60)
    response = httpx.post(f"{service.base_url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2,
                                "script": "first-byte-delay=0.6"})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_a_whole_answer_beyond_its_bound_is_504(proxy: Callable[..., Service],
                                                upstream: Callable[..., Service]) -> None:
    backend = upstream()
    service = single(proxy, backend, response_seconds=0.5)
    response = httpx.post(f"{service.base_url}/v1/chat/completions", timeout=30,
                          json={"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2,
                                "script": "first-byte-delay=3600"})
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout" and "0.5 s (timeouts.response_seconds)" in error["message"]
    wait_until(lambda: stats(backend)["disconnects"] == 1, 30, "the backend request to be closed (vLLM aborts it)")


def test_idle_timeout_ends_the_stream_with_an_error_event(proxy: Callable[..., Service],
                                                          upstream: Callable[..., Service]) -> None:
    service = single(proxy, upstream(), idle_seconds=0.5)
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 10, "stream": True, "script": "stall-after=2"}
    with httpx.stream("POST", f"{service.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        events = [line for line in response.iter_lines() if line]
    assert len(events) == 3
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "upstream_timeout"


def test_stream_ends_and_is_counted_at_done_even_if_the_backend_lingers(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """A client may close as soon as it reads [DONE] (benchmark clients do). The proxy ends the
    response there and counts the usage then, not when the backend finally ends its body: here
    the backend would take an hour, so reading the response to its end proves it."""
    backend = upstream()
    service = single(proxy, backend, idle_seconds=1)
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}, "script": "linger-after-done=3600"}
    with httpx.stream("POST", f"{service.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        events = [line for line in response.iter_lines() if line]   # reads to the end of the body
    assert events[-1] == "data: [DONE]"
    assert metric(service, 'qwen_proxy_completion_tokens_total{model="tiny-qwen3"}') == 7
    # The lingering backend connection is closed after idle_seconds, not kept for an hour.
    wait_until(lambda: stats(backend)["disconnects"] == 1, 30, "the proxy to close the lingering backend")


def test_many_short_streams_share_pooled_connections_without_crossing(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """Backend connections are reused across requests. A connection must not go back to the pool
    while its request still reads it: short responses that arrive whole in one read, many at
    once, each reach their own client complete (a connection handed over too early cut streams
    and took the backend for dead)."""
    service = single(proxy, upstream())

    async def client(index: int, http: httpx.AsyncClient) -> list[tuple[int, str, int, int]]:
        results = []
        for round_ in range(25):
            asked = 1 + (index + round_) % 3
            body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": asked,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", f"{service.base_url}/v1/chat/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines() if line]
            usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
            results.append((response.status_code, lines[-1], usage["completion_tokens"], asked))
        return results

    async def main() -> list[tuple[int, str, int, int]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
            batches = await asyncio.gather(*(client(index, http) for index in range(16)))
        return [result for batch in batches for result in batch]

    results = asyncio.run(main())
    bad = [(status, last, tokens, asked) for status, last, tokens, asked in results
           if status != 200 or last != "data: [DONE]" or tokens != asked]
    assert not bad, f"{len(bad)} of {len(results)} streams failed, e.g. {bad[:3]}"
    assert metric(service, 'qwen_proxy_upstream_errors_total{kind="reset",model="tiny-qwen3"}') == 0


def test_backend_connections_are_reused(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    backend = upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}],
                     "health_interval_seconds": 3600})  # health checks use connections of their own anyway
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2}
    for stream in (False, True, True, False, True):
        events = stream_events(service, {**body, "stream": True}, {}) if stream else None
        if events is not None:
            assert events[-1] == "data: [DONE]"
        else:
            assert httpx.post(f"{service.base_url}/v1/chat/completions", json=body, timeout=30).status_code == 200
    assert stats(backend)["requests"] == 5 and stats(backend)["connections"] == 1
