"""The client and the load patterns against the scripted upstream: error types, limits, arrivals."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import loadgen
from benchmarks.client import Endpoint
from benchmarks.records import RequestRecord
from benchmarks.stats import summarize
from tests.conftest import Service, free_port, start_scripted_upstream


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_scripted_upstream(tmp_path_factory.mktemp("scripted"), delay_ms=2)
    yield service
    service.stop()


def body(tokens: int = 8, script: str | None = None, stream: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": tokens, "stream": stream, "stream_options": {"include_usage": True}}
    if script:
        out["script"] = script
    return out


def run(endpoint: Endpoint, bodies: list[dict[str, Any]], pattern: loadgen.Pattern,
        **kwargs: Any) -> list[RequestRecord]:
    return asyncio.run(loadgen.run(endpoint, bodies, pattern, **kwargs))


def test_streamed_request_is_timed_and_counted_from_usage(upstream: Service) -> None:
    [r] = run(Endpoint(upstream.base_url, "tiny-qwen3"), [body(tokens=12)], loadgen.Pattern(concurrency=1))
    assert r.ok and r.error is None
    assert len(r.token_times) == 12 and r.token_times == sorted(r.token_times)
    assert r.completion_tokens == 12 and r.prompt_tokens == 8
    assert r.ttft == r.token_times[0] and r.end == r.token_times[-1]
    assert r.ttft is not None and r.end > r.ttft


def test_reasoning_deltas_are_read_and_split(upstream: Service) -> None:
    [r] = run(Endpoint(upstream.base_url, "tiny-qwen3"), [body(tokens=10, script="reasoning=6")],
              loadgen.Pattern(concurrency=1))
    assert r.reasoning_chunks == 6 and r.answer_chunks == 4
    assert r.first_answer_time == r.token_times[6]


def test_non_streaming_request(upstream: Service) -> None:
    [r] = run(Endpoint(upstream.base_url, "tiny-qwen3", stream=False), [body(tokens=5, stream=False)],
              loadgen.Pattern(concurrency=1))
    assert r.ok and r.completion_tokens == 5 and r.token_times == [] and r.end is not None


@pytest.mark.parametrize("script, error", [
    ("die-after=3", "incomplete_stream"),     # backend crashed mid-stream: no [DONE]
])
def test_stream_failures_are_typed(upstream: Service, script: str, error: str) -> None:
    [r] = run(Endpoint(upstream.base_url, "tiny-qwen3"), [body(script=script)], loadgen.Pattern(concurrency=1))
    assert not r.ok and r.error in (error, "connection_lost")
    assert len(r.token_times) == 3


def test_stall_is_a_timeout(upstream: Service) -> None:
    endpoint = Endpoint(upstream.base_url, "tiny-qwen3", timeout_s=0.5)
    [r] = run(endpoint, [body(script="stall-after=2")], loadgen.Pattern(concurrency=1))
    assert not r.ok and r.error == "timeout"


def test_http_errors_and_refused_connections_are_typed(upstream: Service) -> None:
    [r] = run(Endpoint(upstream.base_url + "/nope", "tiny-qwen3"), [body()], loadgen.Pattern(concurrency=1))
    assert r.error == "http_404"
    [r] = run(Endpoint(f"http://127.0.0.1:{free_port()}", "tiny-qwen3"), [body()], loadgen.Pattern(concurrency=1))
    assert r.error == "connection_refused"
    assert summarize([r])["errors"] == {"connection_refused": 1}


def peak_in_flight(endpoint: Endpoint, bodies: list[dict[str, Any]], pattern: loadgen.Pattern) -> int:
    """Run the pattern, counting the requests in flight at once."""
    in_flight = 0
    peak = 0

    async def main() -> list[RequestRecord]:
        original = loadgen.send

        async def counting(*args: Any) -> RequestRecord:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await original(*args)
            finally:
                in_flight -= 1

        loadgen.send = counting  # type: ignore[assignment]
        try:
            return await loadgen.run(endpoint, bodies, pattern)
        finally:
            loadgen.send = original  # type: ignore[assignment]

    records = asyncio.run(main())
    assert len(records) == len(bodies) and all(r.ok for r in records)
    return peak


def test_closed_loop_never_exceeds_its_concurrency(upstream: Service) -> None:
    endpoint = Endpoint(upstream.base_url, "tiny-qwen3")
    assert peak_in_flight(endpoint, [body(tokens=4)] * 30, loadgen.Pattern(concurrency=3)) == 3


def test_max_concurrency_caps_an_open_loop(upstream: Service) -> None:
    endpoint = Endpoint(upstream.base_url, "tiny-qwen3")
    bodies = [body(tokens=8)] * 20
    assert peak_in_flight(endpoint, bodies, loadgen.Pattern(concurrency=2, rate=math.inf)) == 2
    assert peak_in_flight(endpoint, bodies, loadgen.Pattern(rate=math.inf)) > 2   # uncapped: all at once


def test_duration_bound_stops_issuing(upstream: Service) -> None:
    records = run(Endpoint(upstream.base_url, "tiny-qwen3"), [body(tokens=4)] * 100_000,
                  loadgen.Pattern(concurrency=2), duration_s=0.5)
    assert 0 < len(records) < 100_000
    assert all(r.ok for r in records)


def test_arrival_gaps_have_the_asked_mean_and_burstiness() -> None:
    rng = random.Random(0)
    poisson = loadgen.arrival_gaps(4.0, 1.0, 20_000, rng)
    assert statistics.mean(poisson) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(poisson) == pytest.approx(0.25, rel=0.05)       # exponential: sd = mean
    bursty = loadgen.arrival_gaps(4.0, 0.25, 20_000, rng)
    assert statistics.mean(bursty) == pytest.approx(0.25, rel=0.06)
    assert statistics.stdev(bursty) == pytest.approx(0.5, rel=0.08)         # gamma: sd = mean / sqrt(shape)
    assert loadgen.arrival_gaps(math.inf, 1.0, 3, rng) == [0.0, 0.0, 0.0]


def test_open_loop_sends_at_the_rate(upstream: Service) -> None:
    records = run(Endpoint(upstream.base_url, "tiny-qwen3"), [body(tokens=2)] * 40,
                  loadgen.Pattern(rate=40.0), seed=1)
    starts = sorted(r.start for r in records)
    expected = sum(loadgen.arrival_gaps(40.0, 1.0, 40, random.Random(1))[1:])
    assert starts[-1] - starts[0] == pytest.approx(expected, rel=0.25, abs=0.1)


def test_pattern_labels() -> None:
    assert loadgen.Pattern(concurrency=8).label == "concurrency=8"
    assert loadgen.Pattern(rate=2.0).label == "rate=2/s"
    assert loadgen.Pattern(4, math.inf, 0.5).label == "rate=inf, burstiness 0.5, max concurrency 4"


def test_results_dir_is_git_ignored() -> None:
    ignored = (Path(__file__).parents[2] / ".gitignore").read_text().split()
    assert "results/" in ignored
