"""The backends of each model: which one gets a request, and their health.

Health is decided by the periodic `/health` checks (and a refused connection); a request that
fails on a backend after it was sent does not mark the backend down by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from yarl import URL

from serving.metrics import Metrics
from serving.upstream import Upstream

# The targets of the shaped routes: their URLs are built once per backend.
CACHED_TARGETS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(eq=False)
class Backend:
    url: str
    healthy: bool = False
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.base = URL(self.url)
        self._urls: dict[str, URL] = {}

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
    """The backends serving one model (one vLLM server each)."""

    def __init__(self, model: str, urls: list[str], metrics: Metrics) -> None:
        self.model = model
        self.backends = [Backend(url) for url in urls]
        self.metrics = metrics
        self._turn = 0

    def pick(self, exclude: set[Backend]) -> Backend | None:
        """Fewest requests in flight; ties go round-robin, not always to the first backend."""
        candidates = [b for b in self.backends if b.healthy and b not in exclude]
        if not candidates:
            return None
        least = min(b.in_flight for b in candidates)
        tied = [b for b in candidates if b.in_flight == least]
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    def set_health(self, backend: Backend, healthy: bool) -> None:
        backend.healthy = healthy
        self.metrics.backend_up.labels(self.model, backend.url).set(1 if healthy else 0)


async def check_all(upstream: Upstream, models: list[ModelBackends]) -> None:
    checks = [(model, backend) for model in models for backend in model.backends]
    results = await asyncio.gather(*(upstream.healthy(backend.base) for _, backend in checks))
    for (model, backend), healthy in zip(checks, results, strict=True):
        if healthy is not None:  # None: the proxy could not probe (its own limits); keep what was known
            model.set_health(backend, healthy)


async def health_loop(upstream: Upstream, models: list[ModelBackends], interval: float) -> None:
    while True:
        with contextlib.suppress(Exception):  # a failed round must never end the loop
            await check_all(upstream, models)
        await asyncio.sleep(interval)
