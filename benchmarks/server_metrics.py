"""The server's own view of a run: Prometheus counters before/after, gauges sampled during.

Reported next to the client's figures so a disagreement is visible: tokens the server counted,
preemptions, peak KV-cache usage and queueing (vLLM), and the proxy's token counters. With
several vLLM servers behind a proxy, each one's requests and prefix-cache hits show where the
requests went and what their caches saved (`backends`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from deploy.engines.registry import ENGINES

# Counter deltas over the run, per engine: each engine's own names (deploy/engines/), so a run
# against vLLM or SGLang reads what that engine exposes.
ENGINE_COUNTERS = {name: dict(engine.metrics.counters) for name, engine in ENGINES.items()}
PROXY_COUNTERS = {
    "qwen_proxy_prompt_tokens_total": "prompt_tokens",
    "qwen_proxy_completion_tokens_total": "completion_tokens",
    "qwen_proxy_reasoning_tokens_total": "reasoning_tokens",
    "qwen_proxy_requests_total": "requests",
}
# Gauges whose peak during the run matters: the engines' and the proxy's.
PEAK_GAUGES = {
    **{name: key for engine in ENGINES.values() for name, key in engine.metrics.peak_gauges.items()},
    "qwen_proxy_requests_in_flight": "peak_proxy_in_flight",
}
MODEL_LABELS = ("model_name", "model")
# The proxy's routing decisions are kept per reason (name:reason), not summed.
ROUTING_DECISIONS = "qwen_proxy_routing_decisions_total"
_LABELLED = re.compile(r"^([A-Za-z0-9_.-]+)=(https?://.+)$")


def split_metrics_url(spec: str) -> tuple[str, str]:
    """`NAME=URL` or `URL` -> (name, url); an unnamed URL is named by its host:port."""
    labelled = _LABELLED.match(spec)
    if labelled:
        return labelled.group(1), labelled.group(2)
    if not spec.startswith(("http://", "https://")):
        raise ValueError(f"--metrics-url {spec!r}: expected URL or NAME=URL with an http(s):// URL")
    return urllib.parse.urlsplit(spec).netloc, spec


def parse(text: str, models: frozenset[str]) -> dict[str, float]:
    """Sum each sample name over the series of `models` (the served name and its aliases; all
    series when they carry no model label)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = next((sample.labels[k] for k in MODEL_LABELS if k in sample.labels), None)
            if models and label is not None and label not in models:
                continue
            name = sample.name
            if name == ROUTING_DECISIONS:
                name = f"{name}:{sample.labels.get('reason', '')}"
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


@dataclass
class Scraper:
    """Scrapes one /metrics URL before, during (every `interval_s`) and after a run."""

    url: str
    models: frozenset[str]
    name: str = ""
    interval_s: float = 0.1
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    _task: asyncio.Task[None] | None = None

    async def _get(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(self.url, timeout=aiohttp.ClientTimeout(total=5)) as response:
            response.raise_for_status()
            return parse(await response.text(), self.models)

    def _note_peaks(self, values: dict[str, float]) -> None:
        for name in PEAK_GAUGES:
            if name in values:
                self.peaks[name] = max(self.peaks.get(name, 0.0), values[name])

    async def _settled(self, session: aiohttp.ClientSession, settle_s: float = 3.0) -> dict[str, float]:
        """Scrape until the counters stop moving: servers count a request just after its last
        byte, so a scrape right at the edge of a run would split requests across it."""
        deadline = asyncio.get_running_loop().time() + settle_s
        counters = (*(name for table in ENGINE_COUNTERS.values() for name in table), *PROXY_COUNTERS)
        previous = await self._get(session)
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # polling the server's counters, bounded by settle_s
            current = await self._get(session)
            if all(current.get(k) == previous.get(k) for k in counters):
                return current
            previous = current
        return previous

    async def start(self, session: aiohttp.ClientSession) -> None:
        try:
            self.before = await self._settled(session)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self._note_peaks(self.before)

        async def sample() -> None:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    self._note_peaks(await self._get(session))
                await asyncio.sleep(self.interval_s)  # a sampling period, not synchronisation

        self._task = asyncio.create_task(sample())

    def _requests_counted(self) -> float:
        for name in ("vllm:request_success_total", "sglang:num_requests_total", "qwen_proxy_requests_total"):
            if name in self.after:
                return self.after[name] - self.before.get(name, 0.0)
        return float("inf")

    async def stop_sampling(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def final_scrape(self, session: aiohttp.ClientSession, settle_s: float) -> None:
        if self.error is not None:
            return
        try:
            self.after = await self._settled(session, settle_s)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self._note_peaks(self.after)

    async def stop(self, session: aiohttp.ClientSession, requests: int, settle_s: float = 3.0) -> None:
        """The final scrape, once the server has counted at least `requests` and its counters
        stopped moving."""
        await stop_all([self], session, requests, settle_s)

    @property
    def kind(self) -> str:
        values = self.after or self.before
        for engine in ENGINE_COUNTERS:
            if any(k.startswith(f"{engine}:") for k in values):
                return engine
        return "proxy" if any(k.startswith("qwen_proxy_") for k in values) else "unknown"

    def report(self) -> dict[str, Any]:
        if self.error is not None:
            return {"url": self.url, "name": self.name, "error": self.error}
        kind = self.kind
        counters = ENGINE_COUNTERS.get(kind, PROXY_COUNTERS)
        out: dict[str, Any] = {"url": self.url, "name": self.name, "kind": kind}
        for name, key in counters.items():
            if name in self.after:
                out[key] = self.after[name] - self.before.get(name, 0.0)
        for name, key in PEAK_GAUGES.items():
            if name in self.peaks:
                out[key] = self.peaks[name]
        if kind == "proxy":
            decided = {name.split(":", 1)[1]: value - self.before.get(name, 0.0)
                       for name, value in self.after.items() if name.startswith(ROUTING_DECISIONS + ":")}
            out["routing_decisions"] = {reason: n for reason, n in sorted(decided.items()) if n}
        if kind == "sglang" and "prompt_tokens" in out:
            out["prefix_cache_queries"] = out["prompt_tokens"]
        if kind in ENGINE_COUNTERS and out.get("prefix_cache_queries"):
            out["prefix_cache_hit_rate"] = out.get("prefix_cache_hits", 0.0) / out["prefix_cache_queries"]
        return out


async def stop_all(scrapers: Sequence[Scraper], session: aiohttp.ClientSession, requests: int,
                   settle_s: float = 3.0) -> None:
    """The final scrapes, once the servers have counted the run's `requests` and their counters
    stopped moving: each proxy all of them, the vLLM servers together (each saw its share)."""
    for scraper in scrapers:
        await scraper.stop_sampling()
    deadline = asyncio.get_running_loop().time() + settle_s
    while True:
        for scraper in scrapers:
            await scraper.final_scrape(session, settle_s)
        live = [s for s in scrapers if s.error is None]
        engines = [s for s in live if s.kind in ENGINE_COUNTERS]
        others = [s for s in live if s.kind not in ENGINE_COUNTERS]
        engines_done = not engines or sum(s._requests_counted() for s in engines) >= requests
        if (engines_done and all(s._requests_counted() >= requests for s in others)) \
                or asyncio.get_running_loop().time() > deadline:
            return


def backends(reports: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Where the requests went and what each vLLM's prefix cache saved: per vLLM server (by
    name), and over all of them (hit rate = hits / queries summed; requests max / mean)."""
    engines = [r for r in reports if r.get("kind") in ENGINE_COUNTERS]
    if not engines:
        return None
    per: dict[str, dict[str, Any]] = {}
    for report in engines:
        per[report["name"] or report["url"]] = {
            "requests": report.get("requests_finished", 0.0),
            "prefix_cache_queries": report.get("prefix_cache_queries", 0.0),
            "prefix_cache_hits": report.get("prefix_cache_hits", 0.0),
            "prefix_cache_hit_rate": report.get("prefix_cache_hit_rate"),
        }
    queries = sum(b["prefix_cache_queries"] for b in per.values())
    hits = sum(b["prefix_cache_hits"] for b in per.values())
    requests = [b["requests"] for b in per.values()]
    mean = sum(requests) / len(requests)
    return {
        "per_backend": per,
        "requests": sum(requests),
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "requests_max_over_mean": max(requests) / mean if mean else None,
    }
