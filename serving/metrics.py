"""The proxy's Prometheus metrics: own prefix, bounded labels (never user input), one registry.

With several worker processes (PROMETHEUS_MULTIPROC_DIR set by the supervisor before
prometheus-client is imported) every metric is kept in per-process files and `exposition()`
sums them, so whichever worker answers /metrics tells the whole truth.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from serving.loop_histogram import LoopHistogram

PREFIX = "qwen_proxy"
# Set (by the supervisor, before prometheus-client is imported) when several workers share the metrics.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# LLM latencies: milliseconds for a cached prefill up to minutes for long reasoning.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 60, 120, 300, 600)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600, 1200, 1800)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        p = PREFIX

        def on_loop(name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> Any:
            # Observed on the event loop, per request or per streamed token: the lock-free histogram, unless
            # the observations must reach the other workers' scrapes (prometheus-client's file-backed one).
            if self.multiprocess_dir:
                return Histogram(name, documentation, labels, buckets=buckets, registry=registry)
            return LoopHistogram(name, documentation, labels, buckets, registry)

        self.requests = Counter(f"{p}_requests", "Requests answered, by model, route and status class",
                                ["model", "route", "status_class"], registry=registry)
        self.duration = on_loop(f"{p}_request_duration_seconds", "Request time until the last byte",
                                ["model", "route"], DURATION_BUCKETS)
        self.ttft = on_loop(f"{p}_time_to_first_token_seconds", "Time to the first streamed token", ["model"],
                            LATENCY_BUCKETS)
        self.ttfat = on_loop(f"{p}_time_to_first_answer_token_seconds",
                             "Time to the first answer token (after any reasoning)", ["model"], LATENCY_BUCKETS)
        self.itl = on_loop(f"{p}_inter_token_latency_seconds", "Gap between streamed token events", ["model"],
                           TOKEN_GAP_BUCKETS)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens (backend usage)", ["model"],
                                     registry=registry)
        self.completion_tokens = Counter(f"{p}_completion_tokens", "Completion tokens (backend usage)",
                                         ["model"], registry=registry)
        self.reasoning_tokens = Counter(f"{p}_reasoning_tokens", "Reasoning tokens (backend usage)",
                                        ["model"], registry=registry)
        self.in_flight = Gauge(f"{p}_requests_in_flight", "Requests being answered", ["model"],
                               registry=registry, multiprocess_mode="livesum")
        self.upstream_errors = Counter(f"{p}_upstream_errors", "Backend failures by kind (connect, "
                                       "stale_connection, reset, timeout, http_5xx)",
                                       ["model", "kind"], registry=registry)
        self.defaults_applied = Counter(f"{p}_defaults_applied", "Profile defaults filled into requests",
                                        ["model", "field"], registry=registry)
        self.greedy = Counter(f"{p}_greedy_requests", "Requests with temperature 0, by policy action",
                              ["model", "action"], registry=registry)
        # Each worker checks every backend; the latest check wins.
        self.backend_up = Gauge(f"{p}_backend_up", "1 when the backend's /health answers 200",
                                ["model", "backend"], registry=registry, multiprocess_mode="livemostrecent")
        self.routing = Counter(f"{p}_routing_decisions", "Why each request went to its backend: affinity (where "
                               "its key was placed: its prefix is cached there), new (a key not seen before, placed within the "
                               "bound on keys), overflow (its backend was over the in-flight bound: the key moves), failover "
                               "(its backend was down: the key stays), least_in_flight (no key, or that policy)", ["model", "reason"],
                               registry=registry)
        self.rejected = Counter(f"{p}_rejected_requests", "Requests refused before reaching a backend",
                                ["reason"], registry=registry)
        self.internal_errors = Counter(f"{p}_internal_errors", "Requests failed by an unexpected exception in the "
                                       "proxy (a bug): answered 500 with a request id, logged with its traceback "
                                       "at most every 10 s", ["route"], registry=registry)
        self.exhausted = Counter(f"{p}_resource_exhausted", "Requests answered 503 because the proxy ran out "
                                 "of descriptors or buffers (its own limit), by errno", ["errno"], registry=registry)

        # Children by label values, resolved once: `.labels()` takes a lock and builds tuples on
        # every call, and these are used on every request. Keys are bounded like the labels.
        self._models: dict[str, ModelMetrics] = {}
        self._answered: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def model(self, name: str) -> ModelMetrics:
        """The per-model children (`name` is a configured model name, never client input)."""
        found = self._models.get(name)
        if found is None:
            found = self._models[name] = ModelMetrics(self, name)
        return found

    def answered(self, model: str, route: str, status: int, seconds: float) -> None:
        key = (model, route, status // 100)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (self.requests.labels(model, route, status_class(status)),
                                              self.duration.labels(model, route))
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> bytes:
        if self.multiprocess_dir:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged, self.multiprocess_dir)
            return bytes(generate_latest(merged))
        return bytes(generate_latest(self.registry))


class ModelMetrics:
    """One model's children of the metrics observed on every request."""

    __slots__ = ("completion_tokens", "in_flight", "itl", "prompt_tokens", "reasoning_tokens", "ttfat", "ttft")

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.in_flight = metrics.in_flight.labels(model)
        self.ttft = metrics.ttft.labels(model)
        self.ttfat = metrics.ttfat.labels(model)
        self.itl = metrics.itl.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.completion_tokens = metrics.completion_tokens.labels(model)
        self.reasoning_tokens = metrics.reasoning_tokens.labels(model)


def status_class(status: int) -> str:
    return f"{status // 100}xx"
