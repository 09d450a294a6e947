"""The metric math on hand-built timestamp sequences with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.records import RequestRecord
from benchmarks.runner import find_knee
from benchmarks.stats import Slo, parse_slos, percentile, summarize


def record(index: int, start: float, times: list[float], tokens: int, prompt: int = 10,
           reasoning_chunks: int = 0, first_answer: float | None = None) -> RequestRecord:
    r = RequestRecord(index=index, start=start, ok=True, token_times=times, end=times[-1],
                      prompt_tokens=prompt, completion_tokens=tokens, reasoning_chunks=reasoning_chunks,
                      first_answer_time=first_answer if first_answer is not None else times[0])
    r.answer_chunks = len(times) - reasoning_chunks
    return r


def test_ttft_tpot_itl_e2e_known_answers() -> None:
    # Request 0: first token at 0.1 s, 5 tokens, last at 0.5 s -> TPOT (0.5-0.1)/4 = 0.1 s.
    # Request 1: first at 0.3 s, 3 tokens over two chunks (one holds 2 tokens), last at 0.7 s
    #            -> TPOT (0.7-0.3)/2 = 0.2 s; its ITL gaps are the chunk gaps: [0.4].
    a = record(0, start=100.0, times=[0.1, 0.2, 0.3, 0.4, 0.5], tokens=5)
    b = record(1, start=100.5, times=[0.3, 0.7], tokens=3, prompt=20)
    out = summarize([a, b])
    assert out["completed"] == 2 and out["failed"] == 0
    assert out["median_ttft_ms"] == pytest.approx(200.0)
    assert out["mean_tpot_ms"] == pytest.approx(150.0)
    assert out["max_tpot_ms"] == pytest.approx(200.0)
    assert out["max_itl_ms"] == pytest.approx(400.0)
    assert out["median_itl_ms"] == pytest.approx(100.0)          # gaps 0.1 x4 and 0.4
    assert out["max_e2el_ms"] == pytest.approx(700.0)
    # Duration: first send (100.0) to last finish (100.5 + 0.7 = 101.2).
    assert out["duration"] == pytest.approx(1.2)
    assert out["total_input_tokens"] == 30 and out["total_output_tokens"] == 8
    assert out["request_throughput"] == pytest.approx(2 / 1.2)
    assert out["output_throughput"] == pytest.approx(8 / 1.2)
    assert out["total_token_throughput"] == pytest.approx(38 / 1.2)


def test_one_token_answer_has_no_tpot_but_counts_for_goodput() -> None:
    one = record(0, start=0.0, times=[0.05], tokens=1)
    out = summarize([one], parse_slos("ttft<=100ms,tpot<=1ms"))
    assert math.isnan(out["median_tpot_ms"])
    assert out["good_requests"] == 1


def test_goodput_counts_requests_meeting_every_slo() -> None:
    fast = record(0, 0.0, [0.1, 0.2, 0.3], tokens=3)            # TTFT 100 ms, TPOT 100 ms
    slow_first = record(1, 0.0, [2.5, 2.6, 2.7], tokens=3)      # TTFT 2.5 s
    slow_decode = record(2, 0.0, [0.1, 1.1, 2.1], tokens=3)     # TPOT 1 s
    failed = RequestRecord(index=3, start=0.0, error="http_503")
    out = summarize([fast, slow_first, slow_decode, failed], parse_slos("ttft<=2s, tpot<=200ms"))
    assert out["good_requests"] == 1
    assert out["request_goodput"] == pytest.approx(1 / out["duration"])
    assert out["errors"] == {"http_503": 1}
    assert out["failed"] == 1


def test_no_slo_no_goodput() -> None:
    assert summarize([record(0, 0.0, [0.1, 0.2], tokens=2)])["request_goodput"] is None


@pytest.mark.parametrize("text, expected", [
    ("ttft<=2s", [Slo("ttft", 2.0)]),
    ("ttft<=2s,tpot<=50ms", [Slo("ttft", 2.0), Slo("tpot", 0.05)]),
    (" E2EL <= 1.5s ", [Slo("e2el", 1.5)]),
])
def test_slo_syntax(text: str, expected: list[Slo]) -> None:
    assert parse_slos(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("ttft<2s", "expected <metric><=<number>"),
    ("latency<=2s", "metric one of ttft, tpot, e2el"),
    ("ttft<=2", "with a unit"),
    ("ttft<=-1s", "positive number"),
    ("ttft<=fast", "positive number"),
    ("", "empty SLO"),
])
def test_slo_syntax_errors_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_slos(text)


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=1, max_size=200),
       st.sampled_from([0, 1, 50, 90, 99, 100]))
def test_percentile_matches_numpy(values: list[float], q: int) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_reasoning_split_and_time_to_first_answer() -> None:
    # 3 reasoning chunks then 2 answer chunks; usage does not report reasoning tokens (vLLM on
    # the tiny model), so they are counted from chunks and flagged.
    r = record(0, 0.0, [0.1, 0.2, 0.3, 0.4, 0.5], tokens=5, reasoning_chunks=3, first_answer=0.4)
    out = summarize([r])["reasoning"]
    assert out["reasoning_tokens"] == 3 and out["answer_tokens"] == 2
    assert out["reasoning_tokens_source"] == "counted_chunks"
    assert out["median_ttfat_ms"] == pytest.approx(400.0)
    r.reasoning_tokens = 4  # when usage reports them, usage wins
    assert summarize([r])["reasoning"]["reasoning_tokens"] == 4


def test_no_reasoning_section_for_plain_models() -> None:
    assert "reasoning" not in summarize([record(0, 0.0, [0.1, 0.2], tokens=2)])


def test_knee_is_where_throughput_stops_growing_and_latency_does() -> None:
    def point(label: str, tput: float, ttft: float) -> dict[str, float | str]:
        return {"label": label, "output_throughput": tput, "median_ttft_ms": ttft}
    runs = [point("rate=1", 100, 50), point("rate=2", 200, 55), point("rate=4", 390, 70),
            point("rate=8", 400, 900), point("rate=16", 405, 3000)]
    knee = find_knee(runs)
    assert knee is not None and knee["label"] == "rate=4"
    assert find_knee(runs[:3]) is None
