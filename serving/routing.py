"""The backends of each model: which one gets a request, and their health.

Two policies (models[].routing): `prefix_affinity` keeps requests that share a prompt prefix or
a session on one backend, within bounded load (serving/affinity.py); `least_in_flight` takes
the backend with the fewest requests in flight, ties round-robin. Health is decided by the
periodic `/health` checks (and a refused connection); a request that fails on a backend after it
was sent does not mark the backend down by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from yarl import URL

from serving.affinity import Ring, capacity
from serving.config import ModelEntry
from serving.metrics import Metrics
from serving.resources import ThrottledLog
from serving.upstream import Upstream

# The targets of the shaped routes: their URLs are built once per backend.
CACHED_TARGETS = frozenset({"/v1/chat/completions", "/v1/completions"})
REASONS = ("affinity", "overflow", "failover", "least_in_flight")
# Overflowed keys remembered per model (least recently used forgotten first): bounded memory
# whatever the clients send.
MOVED_KEYS = 65_536


@dataclass(eq=False)
class Backend:
    url: str
    healthy: bool = False
    in_flight: int = 0
    _urls: dict[str, URL] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.base = URL(self.url)

    def url_for(self, target: str) -> URL:
        """The backend URL of a path (and query) exactly as given: `encoded=True` keeps the client's
        percent-encoding, already validated, rather than re-encoding it."""
        url = self._urls.get(target)
        if url is None:
            url = URL(self.url + target, encoded=True)
            if target in CACHED_TARGETS:
                self._urls[target] = url
        return url


class ModelBackends:
    """The backends serving one model (one vLLM server each); the set may change (DNS discovery)."""

    def __init__(self, model: str, entry: ModelEntry, metrics: Metrics) -> None:
        self.model = model
        self.entry = entry
        self.metrics = metrics
        self.affinity = entry.routing == "prefix_affinity"
        self.epsilon = entry.affinity.epsilon
        self.session_header = entry.affinity.session_header.encode()
        self.backends: list[Backend] = []
        self.resolved: dict[str, list[str]] = {}  # each configured URL -> its backends' URLs (DNS)
        self._ring: Ring[Backend] = Ring([])
        # Keys that overflowed, and the backend they went to: their prefix is cached there now.
        self._moved: OrderedDict[int, Backend] = OrderedDict()
        self._turn = 0
        self._decisions = {reason: metrics.routing.labels(model, reason) for reason in REASONS}

    def set_backends(self, backends: Iterable[Backend]) -> None:
        kept = list(backends)
        for gone in set(self.backends) - set(kept):
            with contextlib.suppress(KeyError):
                self.metrics.backend_up.remove(self.model, gone.url)
        self.backends = kept
        self._ring = Ring(kept)

    def pick(self, exclude: set[Backend], key: int | None) -> Backend | None:
        healthy = [b for b in self.backends if b.healthy and b not in exclude]
        if not healthy:
            return None
        if self.affinity and key is not None:
            chosen, reason = self._by_key(key, healthy)
        else:
            chosen, reason = self._least_in_flight(healthy), "least_in_flight"
        self._decisions[reason].inc()
        return chosen

    def _by_key(self, key: int, healthy: list[Backend]) -> tuple[Backend, str]:
        limit = capacity(healthy, self.epsilon)
        usable = set(healthy)
        moved = self._moved.get(key)
        if moved is not None:
            # A conversation that overflowed stays where it went while that backend has room: going
            # back would re-prefill its whole history, the cost affinity is there to avoid; the
            # move is what rebalances a lumpy ring.
            if moved in usable and moved.in_flight + 1 <= limit:
                self._moved.move_to_end(key)
                return moved, "affinity"
            del self._moved[key]
        reason = "affinity"
        for backend in self._ring.walk(key):
            if backend not in usable:
                reason = "failover" if reason == "affinity" else reason  # its owner is down or failed
                continue
            if backend.in_flight + 1 > limit:
                reason = "overflow" if reason == "affinity" else reason
                continue
            if reason == "overflow":
                self._moved[key] = backend
                if len(self._moved) > MOVED_KEYS:
                    self._moved.popitem(last=False)
            return backend, reason
        # Unreachable while capacity >= the mean; kept so a rounding edge can never refuse a request.
        return self._least_in_flight(healthy), reason

    def _least_in_flight(self, healthy: list[Backend]) -> Backend:
        least = min(b.in_flight for b in healthy)
        tied = [b for b in healthy if b.in_flight == least]
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    def set_health(self, backend: Backend, healthy: bool) -> None:
        backend.healthy = healthy
        if backend in self.backends:  # not one discovery dropped meanwhile
            self.metrics.backend_up.labels(self.model, backend.url).set(1 if healthy else 0)


async def check_all(upstream: Upstream, models: list[ModelBackends], skipped: ThrottledLog) -> None:
    checks = [(model, backend) for model in models for backend in model.backends]
    results = await asyncio.gather(*(upstream.healthy(backend.base) for _, backend in checks))
    for (model, backend), healthy in zip(checks, results, strict=True):
        if healthy is None:  # the proxy could not probe (its own limits): keep what was known
            skipped.warning(f"health check of {backend.url} ({model.model}) skipped: the proxy is out of "
                            "descriptors or buffers; the backend keeps its last known state")
        else:
            model.set_health(backend, healthy)


async def health_loop(upstream: Upstream, models: list[ModelBackends], interval: float,
                      skipped: ThrottledLog) -> None:
    while True:
        with contextlib.suppress(Exception):  # a failed round must never end the loop
            await check_all(upstream, models, skipped)
        await asyncio.sleep(interval)
