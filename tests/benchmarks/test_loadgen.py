"""The client and the load patterns against the scripted upstream: error types, limits, arrivals."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks import loadgen
from benchmarks.client import Endpoint, send
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


def test_sglangs_stream_is_read_alike(tmp_path: Path) -> None:
    """SGLang names the reasoning `reasoning_content`, nulls absent fields, puts `usage: null` on
    every chunk and counts reasoning tokens at the top of its usage."""
    sglang = start_scripted_upstream(tmp_path, delay_ms=2, engine="sglang")
    try:
        [r] = run(Endpoint(sglang.base_url, "tiny-qwen3"), [body(tokens=10, script="reasoning=6")],
                  loadgen.Pattern(concurrency=1))
    finally:
        sglang.stop()
    assert r.ok and len(r.token_times) == 10 and r.reasoning_chunks == 6 and r.answer_chunks == 4
    assert (r.prompt_tokens, r.completion_tokens, r.reasoning_tokens) == (8, 10, 6)


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

    async def counting(session: aiohttp.ClientSession, endpoint: Endpoint, body: dict[str, Any],
                       record: RequestRecord) -> RequestRecord:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await send(session, endpoint, body, record)
        finally:
            in_flight -= 1

    records = run(endpoint, bodies, pattern, sender=counting)
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


class VirtualTime:
    """A clock that moves only when the scheduler sleeps or a fake request takes its time, so the
    schedule is checked exactly, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sent_at: list[float] = []

    def clock(self) -> loadgen.Clock:
        return loadgen.Clock(now=lambda: self.now, sleep=self.sleep)

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        await asyncio.sleep(0)   # what is due now runs first (a request created before this sleep)
        self.now = max(self.now, until)

    def sender(self, takes: float) -> loadgen.Sender:
        async def fake(_session: aiohttp.ClientSession, _endpoint: Endpoint, _body: dict[str, Any],
                       record: RequestRecord) -> RequestRecord:
            self.sent_at.append(self.now)
            await asyncio.sleep(0)
            self.now += takes
            record.ok = True
            return record
        return fake


def test_duration_bound_stops_issuing_and_awaits_what_is_in_flight() -> None:
    time = VirtualTime()
    records = run(Endpoint("http://unused", "tiny-qwen3"), [body()] * 1000, loadgen.Pattern(concurrency=1),
                  duration_s=0.5, clock=time.clock(), sender=time.sender(takes=0.1))
    # 0.1 s per request, one at a time: issued at 0, 0.1, ... 0.4; the one issued at 0.4 ends at
    # the deadline and is counted; none is issued at or after it.
    assert time.sent_at == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert len(records) == 5 and all(r.ok for r in records)


def test_arrival_gaps_have_the_asked_mean_and_burstiness() -> None:
    rng = random.Random(0)
    poisson = loadgen.arrival_gaps(4.0, 1.0, 20_000, rng)
    assert statistics.mean(poisson) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(poisson) == pytest.approx(0.25, rel=0.05)       # exponential: sd = mean
    bursty = loadgen.arrival_gaps(4.0, 0.25, 20_000, rng)
    assert statistics.mean(bursty) == pytest.approx(0.25, rel=0.06)
    assert statistics.stdev(bursty) == pytest.approx(0.5, rel=0.08)         # gamma: sd = mean / sqrt(shape)
    assert loadgen.arrival_gaps(math.inf, 1.0, 3, rng) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("pattern", [loadgen.Pattern(rate=40.0), loadgen.Pattern(rate=40.0, burstiness=0.3),
                                     loadgen.Pattern(concurrency=100, rate=40.0)])
def test_open_loop_sends_on_the_arrival_schedule(pattern: loadgen.Pattern) -> None:
    """Each request goes out at its arrival time from the start, not a gap after the previous
    send (requests taking their time do not push the schedule back)."""
    time = VirtualTime()
    run(Endpoint("http://unused", "tiny-qwen3"), [body()] * 40, pattern, seed=1, clock=time.clock(),
        sender=time.sender(takes=0.0))
    gaps = loadgen.arrival_gaps(pattern.rate or 0.0, pattern.burstiness, 40, random.Random(1))
    assert time.sent_at == pytest.approx(list(itertools.accumulate(gaps)))


def test_pattern_labels() -> None:
    assert loadgen.Pattern(concurrency=8).label == "concurrency=8"
    assert loadgen.Pattern(rate=2.0).label == "rate=2/s"
    assert loadgen.Pattern(4, math.inf, 0.5).label == "rate=inf, burstiness 0.5, max concurrency 4"


def test_results_dir_is_git_ignored() -> None:
    ignored = (Path(__file__).parents[2] / ".gitignore").read_text().split()
    assert "results/" in ignored
