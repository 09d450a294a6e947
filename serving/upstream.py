"""Backends of each model: least-in-flight choice, background health checks."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from serving.httpclient import BackendPool, ConnectFailed, ConnectionReset
from serving.metrics import Metrics

HEALTH_TIMEOUT_SECONDS = 2.0


@dataclass(eq=False)
class Backend:
    url: str
    model: str
    healthy: bool = False
    in_flight: int = 0
    connections: BackendPool = field(init=False)

    def open(self) -> None:
        """Create the connection pool (on the running event loop)."""
        self.connections = BackendPool(self.url)


class Pool:
    """The backends serving one model (one vLLM server each)."""

    def __init__(self, model: str, urls: list[str], metrics: Metrics) -> None:
        self.model = model
        self.backends = [Backend(url, model) for url in urls]
        self.metrics = metrics

    def pick(self, exclude: set[Backend]) -> Backend | None:
        candidates = [b for b in self.backends if b.healthy and b not in exclude]
        return min(candidates, key=lambda b: b.in_flight) if candidates else None

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    def set_health(self, backend: Backend, healthy: bool) -> None:
        backend.healthy = healthy
        self.metrics.backend_up.labels(self.model, backend.url).set(1 if healthy else 0)


async def _probe(backend: Backend) -> bool:
    try:
        status, _ = await backend.connections.get("/health", HEALTH_TIMEOUT_SECONDS)
    except (TimeoutError, ConnectFailed, ConnectionReset, OSError):
        return False
    return status == 200


async def check_all(pools: list[Pool]) -> None:
    checks = [(pool, backend) for pool in pools for backend in pool.backends]
    results = await asyncio.gather(*(_probe(backend) for _, backend in checks))
    for (pool, backend), healthy in zip(checks, results, strict=True):
        pool.set_health(backend, healthy)


async def health_loop(pools: list[Pool], interval: float) -> None:
    while True:
        with contextlib.suppress(Exception):  # a failed round must never end the loop
            await check_all(pools)
        await asyncio.sleep(interval)
