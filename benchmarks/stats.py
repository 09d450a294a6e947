"""Benchmark figures from request records: pure functions, each metric defined once.

Definitions (the README repeats them):
- Token chunk: a streamed chunk with a choice (answer or reasoning); vLLM sends one per generated
  token, with empty text while its detokenizer holds back part of a multi-byte character.
- TTFT: request sent -> first token chunk (as `vllm bench serve`).
- E2E latency: request sent -> last token chunk (as `vllm bench serve`).
- TPOT (per request): (E2E - TTFT) / (completion_tokens - 1), completion_tokens from the
  server's usage; requests with fewer than 2 output tokens have none (as `vllm bench serve`).
- ITL: every gap between consecutive token chunks, pooled over requests (a chunk holding
  several tokens is one gap, as `vllm bench serve`).
- Duration: first measured request sent -> last measured request finished.
- Throughputs: totals over the duration; tokens from the server's usage.
- Goodput: completed requests meeting every SLO, per second of duration.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.records import RequestRecord


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, std, median, p90, p99, max (scaled, ms by default); NaN when there are no values."""
    if not values:
        return {k: math.nan for k in ("mean", "std", "median", "p90", "p99", "max")}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {
        "mean": mean * scale,
        "std": std * scale,
        "median": percentile(values, 50) * scale,
        "p90": percentile(values, 90) * scale,
        "p99": percentile(values, 99) * scale,
        "max": max(values) * scale,
    }


@dataclass(frozen=True)
class Slo:
    """A service-level objective on one per-request metric, in seconds."""

    metric: str      # ttft | tpot | e2el
    limit: float

    def met(self, record: RequestRecord) -> bool:
        value = per_request_value(record, self.metric)
        return value is not None and value <= self.limit


SLO_METRICS = ("ttft", "tpot", "e2el")
_UNITS = {"ms": 1e-3, "s": 1.0}


def parse_slos(text: str) -> list[Slo]:
    """`ttft<=2s,tpot<=50ms` -> SLOs. Raises ValueError with the offending part."""
    slos = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, limit = part.partition("<=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"SLO {part!r}: expected <metric><=<number><ms|s> with metric one of "
                             f"{', '.join(SLO_METRICS)}, e.g. ttft<=2s,tpot<=50ms")
        limit = limit.strip().lower()
        unit = "ms" if limit.endswith("ms") else "s" if limit.endswith("s") else ""
        try:
            value = float(limit[: len(limit) - len(unit)])
        except ValueError:
            value = math.nan
        if not unit or not value > 0 or math.isinf(value):
            raise ValueError(f"SLO {part!r}: the limit must be a positive number with a unit, "
                             "ms or s (e.g. 50ms, 2s)")
        slos.append(Slo(name, value * _UNITS[unit]))
    if not slos:
        raise ValueError("empty SLO: give e.g. ttft<=2s,tpot<=50ms")
    return slos


def tpot(record: RequestRecord) -> float | None:
    if record.ttft is None or record.end is None or not record.completion_tokens:
        return None
    if record.completion_tokens < 2:
        return None
    return (record.end - record.ttft) / (record.completion_tokens - 1)


def itls(record: RequestRecord) -> list[float]:
    times = record.token_times
    return [b - a for a, b in itertools.pairwise(times)]


def per_request_value(record: RequestRecord, metric: str) -> float | None:
    if metric == "ttft":
        return record.ttft
    if metric == "e2el":
        return record.e2e
    if metric == "tpot":
        value = tpot(record)
        # A one-token answer has no TPOT; like vllm bench serve it meets any TPOT SLO.
        return 0.0 if value is None and record.ok else value
    raise ValueError(metric)


def summarize(records: Sequence[RequestRecord], slos: Sequence[Slo] = ()) -> dict[str, Any]:
    """The figures of one run. Field names follow `vllm bench serve` where the concept matches."""
    done = [r for r in records if r.ok]
    if records:
        first = min(r.start for r in records)
        last = max(r.start + (r.end if r.end is not None else 0.0) for r in records)
        duration = max(last - first, 1e-9)
    else:
        duration = math.nan
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.completion_tokens or 0 for r in done)
    good = sum(1 for r in done if all(s.met(r) for s in slos)) if slos else None

    result: dict[str, Any] = {
        "duration": duration,
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": dict(Counter(r.error or "unknown" for r in records if not r.ok)),
        "missing_usage": sum(1 for r in done if r.completion_tokens is None),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "request_goodput": None if good is None else good / duration,
        "good_requests": good,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    series = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for r in done if (t := tpot(r)) is not None],
        "itl": [gap for r in done for gap in itls(r)],
        "e2el": [r.e2e for r in done if r.e2e is not None],
    }
    for name, values in series.items():
        for stat, value in distribution(values).items():
            result[f"{stat}_{name}_ms"] = value
    reasoning = reasoning_summary(done)
    if reasoning is not None:
        result["reasoning"] = reasoning
    return result


def reasoning_summary(done: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """Reasoning vs answer tokens and time to the first answer token, for thinking models.

    Reasoning tokens come from usage when the server reports them; otherwise from counting
    reasoning chunks (one token per chunk in vLLM's streaming), flagged as counted.
    """
    if not any(r.reasoning_chunks for r in done):
        return None
    from_usage = all(r.reasoning_tokens for r in done if r.reasoning_chunks)
    reasoning = sum((r.reasoning_tokens if from_usage else r.reasoning_chunks) or 0 for r in done)
    output = sum(r.completion_tokens or 0 for r in done)
    first_answer = [r.first_answer_time for r in done if r.first_answer_time is not None]
    summary: dict[str, Any] = {
        "reasoning_tokens": reasoning,
        "answer_tokens": max(output - reasoning, 0),
        "reasoning_share": reasoning / output if output else math.nan,
        "reasoning_tokens_source": "usage" if from_usage else "counted_chunks",
        "requests_with_answer": len(first_answer),
    }
    for stat, value in distribution(first_answer).items():
        summary[f"{stat}_ttfat_ms"] = value
    return summary


def turn_figures(records: Sequence[RequestRecord], turns: int) -> list[dict[str, Any]]:
    """Per turn of the conversations: how many completed, their TTFT and prompt length (later
    turns carry more history, which a warm prefix cache does not recompute)."""
    out = []
    for turn in range(turns):
        done = [r for r in records if r.turn == turn and r.ok]
        ttft = distribution([r.ttft for r in done if r.ttft is not None])
        prompts = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
        out.append({"turn": turn + 1, "completed": len(done), "median_ttft_ms": ttft["median"],
                    "p99_ttft_ms": ttft["p99"],
                    "mean_prompt_tokens": sum(prompts) / len(prompts) if prompts else None})
    return out


def conversations_completed(records: Sequence[RequestRecord], conversations: int, turns: int) -> int:
    """Conversations whose every turn completed."""
    done = Counter(r.conversation for r in records if r.ok and r.conversation is not None)
    return sum(1 for c in range(conversations) if done[c] == turns)
