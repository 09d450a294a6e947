"""The backends of each model: which one gets a request, and their health.

Two policies (models[].routing): `prefix_affinity` keeps requests that share a prompt prefix or
a session on one backend, within bounded load (serving/affinity.py); `least_in_flight` takes
the backend with the fewest requests in flight, ties round-robin. Health is decided by the
periodic `/health` checks (and a refused connection); a backend that fails requests in a row
after they were sent leaves rotation for a while (serving/ejection.py).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from serving.affinity import Placements, Ring, capacity
from serving.backend import Backend
from serving.config import ModelEntry
from serving.ejection import EJECTED, HALF_OPEN, UP, Ejection
from serving.metrics import BackendSample, Metrics
from serving.resources import ThrottledLog
from serving.upstream import Upstream

REASONS = ("affinity", "new", "overflow", "failover", "least_in_flight")


class ModelBackends:
    """The backends serving one model (one vLLM server each); the set may change (DNS discovery)."""

    def __init__(self, model: str, entry: ModelEntry, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.entry = entry
        self.metrics = metrics
        self.clock = clock
        self.affinity = entry.routing == "prefix_affinity"
        self.epsilon = entry.affinity.epsilon
        self.headroom = entry.affinity.headroom
        self.session_header = entry.affinity.session_header.encode()
        self.backends: list[Backend] = []
        self.resolved: dict[str, list[str]] = {}  # each configured URL -> its backends' URLs (DNS)
        self._ring: Ring[Backend] = Ring([])
        self._placed: Placements[Backend] = Placements()
        self._turn = 0
        self._decisions = {reason: metrics.routing.labels(model, reason) for reason in REASONS}
        self.ejection = Ejection(model, entry.outlier_ejection, metrics.ejections, clock)
        metrics.live.sources.append(self.samples)

    def set_backends(self, backends: Iterable[Backend]) -> None:
        kept = list(backends)
        for gone in set(self.backends) - set(kept):
            self.metrics.backend_left(self.model, gone.url)
        self.backends = kept
        self._ring = Ring(kept)
        self._placed.keep_only(kept)
        self.ejection.recount(kept)

    def pick(self, exclude: set[Backend], key: int | None) -> Backend | None:
        usable = [b for b in self.backends if b.healthy and b not in exclude]
        if self.ejection.out and usable:
            now = self.clock()
            # Every healthy one ejected (one went down since): a suspect backend beats a certain 503,
            # as Envoy's load balancer ignores ejections in its panic mode.
            usable = [b for b in usable if self.ejection.usable(b, now)] or usable
        if not usable:
            return None
        if self.affinity and key is not None:
            chosen, reason = self._by_key(key, usable)
        else:
            chosen, reason = self._least_in_flight(usable), "least_in_flight"
        self._decisions[reason].inc()
        return chosen

    def report(self, backend: Backend, ok: bool) -> None:
        """One attempt's outcome: ok for an answer (a 2xx, or a client's 4xx), not ok for a failure the
        backend caused (a 5xx it produced, a reset after the request went out, a timeout)."""
        self.ejection.report(backend, ok, self.backends)

    def _by_key(self, key: int, healthy: list[Backend]) -> tuple[Backend, str]:
        loads = [b.in_flight for b in healthy]
        usable = set(healthy)
        now = self.clock()
        home = self._placed.home(key, now)
        if home is not None:
            limit = capacity(loads, self.epsilon, self.headroom)
            if home in usable and home.in_flight < limit:
                self._placed.place(key, home, now)
                return home, "affinity"
            # Down (or failed this request): the next on the ring serves it and the key stays home,
            # to come back when home recovers. Full: it moves, and stays where its history now is.
            moving = home in usable
            chosen = self._first_with_room(key, usable - {home}, limit, healthy)
            self._placed.place(key, chosen if moving else home, now)
            return chosen, "overflow" if moving else "failover"
        # A key not seen before (or forgotten): no backend has its prefix yet, so it is placed for
        # balance, on its ring owner unless that one already holds more than (1 + epsilon) x the mean
        # of the live keys placed (consistent hashing with bounded loads, counted in keys): a handful
        # of conversations then splits evenly, which in-flight bounds alone do not make. Nor more than
        # (1 + epsilon) x the mean in flight: the headroom above that keeps a conversation where its
        # history is, and a new one has none, so a replica that just joined (holding no keys) takes new
        # conversations up to that share of the load, and the others take the rest.
        bound = capacity([b.keys for b in healthy], self.epsilon)
        chosen = self._first_with_room(key, {b for b in healthy if b.keys < bound}, capacity(loads, self.epsilon),
                                       healthy)
        self._placed.place(key, chosen, now)
        return chosen, "new"

    def _first_with_room(self, key: int, allowed: set[Backend], limit: int, healthy: list[Backend]) -> Backend:
        """The first backend on the key's ring walk that is allowed and under the in-flight bound;
        else the first usable one under it, so the bound holds over every healthy backend (a
        replica that just joined takes new keys up to it, then the others do); else the least
        loaded of the allowed (or of all), so a rounding edge can never refuse a request."""
        spare = None
        for backend in self._ring.walk(key):
            if backend.in_flight < limit:
                if backend in allowed:
                    return backend
                if spare is None and backend in healthy:
                    spare = backend
        return spare or self._least_in_flight([b for b in healthy if b in allowed] or healthy)

    def _least_in_flight(self, usable: list[Backend]) -> Backend:
        least = min(b.in_flight for b in usable)
        tied = [b for b in usable if b.in_flight == least]
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen

    def set_health(self, backend: Backend, healthy: bool) -> None:
        backend.healthy = healthy

    def health(self) -> dict[str, Any]:
        """For /ready's body: how many backends take requests, how many are ejected, and each one's state."""
        now = self.clock()
        states = {b.url: self.ejection.state(b, now) for b in self.backends}
        return {"healthy": sum(1 for s in states.values() if s == UP),
                "ejected": sum(1 for s in states.values() if s in (EJECTED, HALF_OPEN)),
                "backends": states}

    def samples(self) -> Iterator[BackendSample]:
        now = self.clock()
        for b in self.backends:
            yield BackendSample(self.model, b.url, b.healthy, self.ejection.state(b, now) in (EJECTED, HALF_OPEN),
                                b.keys)


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
                      skipped: ThrottledLog, failed: ThrottledLog | None = None) -> None:
    failed = failed or ThrottledLog()
    while True:
        # Startup probed every backend (discovery's first refresh) before the proxy became ready: a
        # round at once would only race what the first requests find.
        await asyncio.sleep(interval)
        try:
            await check_all(upstream, models, skipped)
        except Exception as exc:  # noqa: BLE001 - a failed round must never end the loop, nor pass unseen
            failed.warning("a round of backend health checks failed; every backend keeps its last known state "
                           "until the next round:\n" + "".join(traceback.format_exception(exc)).rstrip())
