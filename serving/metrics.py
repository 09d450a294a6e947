"""The proxy's Prometheus metrics: own prefix, bounded labels (never user input), one registry.

With several worker processes (PROMETHEUS_MULTIPROC_DIR set by the supervisor before
prometheus-client is imported) every metric is kept in per-process files and `exposition()`
sums them, so whichever worker answers /metrics tells the whole truth. The per-backend state
(up, ejected, conversations) is not kept in files: it is read from the answering process's live
backends at each scrape, so a backend that left (DNS) leaves the scrape with it, which
prometheus-client's file-backed gauges cannot do (they ignore `remove()`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric

from serving.affinity import LIVE_SECONDS
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
        # Per-backend state from the live backends (LiveBackends); the ejections counted in files with
        # the rest, a departed backend's series left out of the scrape (remove(), or _Departed with workers).
        self.live = LiveBackends()
        registry.register(self.live)
        self.ejections = Counter(f"{p}_backend_ejections", "Times the backend was taken out of rotation "
                                 "after failing requests in a row (outlier_ejection)", ["model", "backend"],
                                 registry=registry)
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

    def backend_left(self, model: str, backend: str) -> None:
        """A backend discovery dropped: its counter series leave the scrape."""
        if not self.multiprocess_dir:  # with workers its file keeps it; _Departed leaves it out
            try:
                self.ejections.remove(model, backend)
            except KeyError:
                pass

    def exposition(self) -> bytes:
        if self.multiprocess_dir:
            merged = CollectorRegistry()
            merged.register(_Departed(multiprocess.MultiProcessCollector(None, self.multiprocess_dir), self.live))
            merged.register(self.live)
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


class BackendSample(NamedTuple):
    """One backend's state as a scrape reports it."""

    model: str
    backend: str
    up: bool  # its /health answers 200
    ejected: bool  # out of rotation after failed requests (cooling down or waiting for its trial)
    conversations: int  # prefix-affinity keys placed there and used recently


class LiveBackends:
    """A collector over the backends the proxy has now (each model's `samples`), read at scrape time."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[BackendSample]]] = []

    def samples(self) -> Iterator[BackendSample]:
        for source in self.sources:
            yield from source()

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> list[Metric]:
        return list(self._families(self.samples()))

    @staticmethod
    def _families(samples: Iterable[BackendSample]) -> Iterator[Metric]:
        labels = ["model", "backend"]
        up = GaugeMetricFamily(f"{PREFIX}_backend_up", "1 when the backend's /health answers 200 (this process's "
                               "latest check)", labels=labels)
        ejected = GaugeMetricFamily(f"{PREFIX}_backend_ejected", "1 while the backend is out of rotation after "
                                    "failing requests in a row (outlier_ejection): cooling down, or half-open "
                                    "(one trial request at a time)", labels=labels)
        conversations = GaugeMetricFamily(f"{PREFIX}_backend_conversations", "Prefix-affinity keys (conversations, "
                                          "sessions) placed on the backend and used within the last "
                                          f"{LIVE_SECONDS:g} s, as this process placed them", labels=labels)
        for sample in samples:
            values = [sample.model, sample.backend]
            up.add_metric(values, 1 if sample.up else 0)
            ejected.add_metric(values, 1 if sample.ejected else 0)
            conversations.add_metric(values, sample.conversations)
        yield from (up, ejected, conversations)


# Counters kept per backend in the worker files: a backend no longer live is left out of the scrape.
PER_BACKEND_FILES = frozenset({f"{PREFIX}_backend_ejections"})


class _Departed:
    """The workers' files, without the per-backend series of backends that left."""

    def __init__(self, files: multiprocess.MultiProcessCollector, live: LiveBackends) -> None:
        self.files = files
        self.live = live

    def collect(self) -> Iterator[Metric]:
        present = {(s.model, s.backend) for s in self.live.samples()}
        for metric in self.files.collect():
            if metric.name in PER_BACKEND_FILES:
                metric.samples = [s for s in metric.samples
                                  if (s.labels.get("model"), s.labels.get("backend")) in present]
            yield metric
