"""Failures: backends dying, slow or stalled; clients leaving; retries; graceful drain."""

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


def vllm_running(vllm: RunningServer) -> float:
    for line in httpx.get(vllm.metrics_url, timeout=5).text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.split()[-1])
    raise AssertionError("vllm:num_requests_running not found")


def stream_events(service: Service, body: dict[str, object], actions: dict[int, Callable[[], None]]) -> list[str]:
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

async def _running(client: httpx.AsyncClient, vllm: RunningServer) -> float:
    for line in (await client.get(vllm.metrics_url)).text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.split()[-1])
    raise AssertionError("vllm:num_requests_running not found")


async def _leave_once_running(url: str, body: dict[str, object], vllm: RunningServer, stream: bool) -> None:
    """Send a long request and leave as soon as vLLM is generating it."""
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=60) as client, httpx.AsyncClient(timeout=5) as probe:
        if stream:
            async with client.stream("POST", url, json=body) as response:
                async for _ in response.aiter_lines():
                    if await _running(probe, vllm) >= 1:
                        return  # leaving the block closes the connection mid-stream
            raise AssertionError("the stream ended before vLLM reported it running")
        task = asyncio.create_task(client.post(url, json=body))
        while await _running(probe, vllm) < 1:
            if task.done():
                raise AssertionError(f"the request ended before vLLM reported it running: {task.result()}")
            assert time.monotonic() < deadline, "the request never started running"
            await asyncio.sleep(0.02)
        task.cancel()


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "non-streaming"])
def test_client_leaving_aborts_vllm(proxy_server: Service, vllm_server: RunningServer, stream: bool) -> None:
    # Two sequences of 1,900 forced tokens: seconds of work on the CPU, long enough to leave mid-way.
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 1900, "min_tokens": 1900, "n": 2,
            "stream": stream}
    url = f"{proxy_server.base_url}/v1/chat/completions"
    asyncio.run(_leave_once_running(url, body, vllm_server, stream))
    gone = time.monotonic()
    wait_until(lambda: vllm_running(vllm_server) == 0, 1.0, "vLLM to abort the request", interval=0.05)
    assert time.monotonic() - gone <= 1.0


def test_client_leaving_before_first_token_closes_upstream(proxy: Callable[..., Service],
                                                            upstream: Callable[..., Service]) -> None:
    backend = upstream()
    service = single(proxy, backend)
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "stream": True}

    async def leave() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            task = asyncio.create_task(client.post(f"{service.base_url}/v1/chat/completions",
                                                   json={**body, "script": "first-byte-delay=30"}))
            deadline = time.monotonic() + 10
            while stats(backend)["in_flight"] < 1:
                assert time.monotonic() < deadline, "the request never reached the upstream"
                await asyncio.sleep(0.02)
            task.cancel()

    asyncio.run(leave())
    wait_until(lambda: stats(backend)["disconnects"] == 1, 1.0, "the upstream request to be closed", 0.05)
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
    wait_until(lambda: not http_ok(f"{service.base_url}/ready"), 5, "/ready to report the backend down")
    assert httpx.post(f"{service.base_url}/v1/chat/completions", json=short, timeout=10).status_code == 503
    revived = start_scripted_upstream(tmp_path, port=backend.port)
    try:
        wait_until(lambda: http_ok(f"{service.base_url}/ready"), 10, "the backend to be seen again")
        assert httpx.post(f"{service.base_url}/v1/chat/completions", json=short, timeout=10).status_code == 200
    finally:
        revived.stop()


def test_connect_failure_is_retried_on_another_backend(proxy: Callable[..., Service],
                                                       upstream: Callable[..., Service]) -> None:
    first, second = upstream(), upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [first.base_url, second.base_url]}],
                     "health_interval_seconds": 3600})  # the proxy will not notice the death by itself
    first.stop(signal.SIGKILL)
    response = httpx.post(f"{service.base_url}/v1/chat/completions", timeout=10,
                          json={"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2})
    assert response.status_code == 200 and stats(second)["requests"] == 1
    assert metric(service, 'qwen_proxy_upstream_errors_total{kind="connect",model="tiny-qwen3"}') == 1


def test_disconnect_before_any_byte_is_retried_without_marking_the_backend_down(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """A dropped connection before the answer (e.g. a keep-alive connection the backend was
    closing) is retried; only a refused connection means the backend is down."""
    flaky, good = upstream(close_before_response=True), upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [flaky.base_url, good.base_url]}],
                     "health_interval_seconds": 3600})
    response = httpx.post(f"{service.base_url}/v1/chat/completions", timeout=10,
                          json={"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2})
    assert response.status_code == 200
    assert stats(flaky)["requests"] == 3 and stats(good)["requests"] == 1  # 3 tries, then the other
    assert metric(service, f'qwen_proxy_backend_up{{backend="{flaky.base_url}",model="tiny-qwen3"}}') == 1
    assert metric(service, 'qwen_proxy_upstream_errors_total{kind="reset",model="tiny-qwen3"}') == 1


def test_fewest_requests_in_flight_wins(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    first, second = upstream(delay_ms=20), upstream(delay_ms=20)
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [first.base_url, second.base_url]}]})
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
                          json={"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2,
                                "script": "first-byte-delay=5"})
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"


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
    response there and counts the usage then, not when the backend finally closes its body."""
    service = single(proxy, upstream())
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}, "script": "linger-after-done=5"}
    started = time.monotonic()
    with httpx.stream("POST", f"{service.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        events = [line for line in response.iter_lines() if line]   # reads to the end of the body
    assert events[-1] == "data: [DONE]"
    assert time.monotonic() - started < 4, "the proxy held the response until the backend's end of body"
    sample = 'qwen_proxy_completion_tokens_total{model="tiny-qwen3"}'
    assert metric(service, sample) == 7


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


def test_a_reused_backend_connection_is_not_closed_by_the_previous_requests_timer(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    """After [DONE] the proxy gives a lingering backend `idle_seconds` to end its body, then closes
    the connection. Once the body did end and the connection carries the next request, that
    timer must leave it alone."""
    backend = upstream()
    entry = {"profile": "tiny-qwen3", "backends": [backend.base_url], "timeouts": {"idle_seconds": 1.0}}
    service = proxy({"models": [entry], "health_interval_seconds": 600})  # no health check takes the connection
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    events = stream_events(service, {**body, "script": "linger-after-done=0.2"}, {})
    assert events[-1] == "data: [DONE]"
    wait_until(lambda: stats(backend)["in_flight"] == 0, 10, "the backend to end the first body")
    # Waits at the backend across the moment the first request's timer fires.
    events = stream_events(service, {**body, "script": "first-byte-delay=1.5"}, {})
    assert events[-1] == "data: [DONE]"
    assert stats(backend) == {"requests": 2, "disconnects": 0, "in_flight": 0}


# ---- graceful shutdown ----------------------------------------------------------------------------

def test_sigterm_drains_streams_in_flight(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    service = single(proxy, upstream(delay_ms=50))
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 40, "stream": True}

    def terminate_mid_stream() -> None:
        service.process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{service.base_url}/ready").status_code == 503, 5, "/ready 503")
        refused = httpx.post(f"{service.base_url}/v1/chat/completions", json=body, timeout=10)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]

    events = stream_events(service, body, {2: terminate_mid_stream})
    assert events[-1] == "data: [DONE]" and len(events) == 41
    assert service.process.wait(timeout=20) == 0
