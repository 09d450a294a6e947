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
REASONS = ("affinity", "new", "overflow", "failover", "least_in_flight")
# Keys remembered per model with the backend they were placed on (least recently used forgotten
# first): bounded memory whatever the clients send.
PLACED_KEYS = 65_536


@dataclass(eq=False)
class Backend:
    url: str
    healthy: bool = False
    in_flight: int = 0
    keys: int = 0  # prefix-affinity keys placed here (ModelBackends' table)
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
        self.headroom = entry.affinity.headroom
        self.session_header = entry.affinity.session_header.encode()
        self.backends: list[Backend] = []
        self.resolved: dict[str, list[str]] = {}  # each configured URL -> its backends' URLs (DNS)
        self._ring: Ring[Backend] = Ring([])
        # Each key seen, and the backend holding its prefix (where it was placed or moved to).
        self._placed: OrderedDict[int, Backend] = OrderedDict()
        self._turn = 0
        self._decisions = {reason: metrics.routing.labels(model, reason) for reason in REASONS}

    def set_backends(self, backends: Iterable[Backend]) -> None:
        kept = list(backends)
        for gone in set(self.backends) - set(kept):
            with contextlib.suppress(KeyError):
                self.metrics.backend_up.remove(self.model, gone.url)
        self.backends = kept
        self._ring = Ring(kept)
        staying = set(kept)
        for key, backend in list(self._placed.items()):
            if backend not in staying:  # its cache left with it: placed afresh when seen again
                del self._placed[key]

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
        limit = capacity([b.in_flight for b in healthy], self.epsilon, self.headroom)
        usable = set(healthy)
        home = self._placed.get(key)
        if home is not None:
            if home in usable and home.in_flight + 1 <= limit:
                self._placed.move_to_end(key)
                return home, "affinity"
            # Down (or failed this request): the next on the ring serves it and the key stays home,
            # to come back when home recovers. Full: it moves, and stays where its history now is.
            moving = home in usable
            reason = "overflow" if moving else "failover"
            chosen = self._first_with_room(key, usable - {home}, limit, healthy)
            if moving:
                self._place(key, chosen)
            return chosen, reason
        # A key not seen before (or forgotten): no backend has its prefix yet, so it is placed for
        # balance, on its ring owner unless that one already holds more than (1 + epsilon) x the
        # mean of the keys placed (consistent hashing with bounded loads, counted in keys): a
        # handful of conversations then splits evenly, which in-flight bounds alone do not make.
        keys = capacity([b.keys for b in healthy], self.epsilon)
        fits = {b for b in healthy if b.keys + 1 <= keys}
        chosen = self._first_with_room(key, fits or usable, limit, healthy)
        self._place(key, chosen)
        return chosen, "new"

    def _first_with_room(self, key: int, allowed: set[Backend], limit: int, healthy: list[Backend]) -> Backend:
        """The first backend on the key's ring walk that is allowed and under the in-flight bound."""
        for backend in self._ring.walk(key):
            if backend in allowed and backend.in_flight + 1 <= limit:
                return backend
        # Every allowed one is full (or none is allowed: the key's home was the only usable one):
        # the least loaded takes it, so a rounding edge can never refuse a request.
        return self._least_in_flight([b for b in healthy if b in allowed] or healthy)

    def _place(self, key: int, backend: Backend) -> None:
        before = self._placed.pop(key, None)
        if before is not None:
            before.keys -= 1
        self._placed[key] = backend
        backend.keys += 1
        if len(self._placed) > PLACED_KEYS:
            _, oldest = self._placed.popitem(last=False)
            oldest.keys -= 1

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
