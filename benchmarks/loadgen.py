"""Load patterns: fixed concurrency (closed loop) or Poisson/gamma arrivals at a rate (open loop).

The scheduler yields nothing but timestamps and records: statistics are computed afterwards
(stats.py), so the event loop only sends requests and reads chunks while the clock runs.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from benchmarks.client import Endpoint, send
from benchmarks.records import RequestRecord

Sender = Callable[[aiohttp.ClientSession, Endpoint, dict[str, Any], RequestRecord], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Clock:
    """Where the scheduler reads the time and how it waits (a test passes a virtual one)."""

    now: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


REAL_CLOCK = Clock()


@dataclass(frozen=True)
class Pattern:
    """How requests arrive. rate=None: closed loop at `concurrency`; rate=inf: all at once."""

    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0         # gamma shape: 1 = Poisson, <1 burstier, >1 more regular

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"concurrency={self.concurrency}"
        rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}/s"
        extra = f", max concurrency {self.concurrency}" if self.concurrency else ""
        burst = f", burstiness {self.burstiness:g}" if self.burstiness != 1.0 else ""
        return f"rate={rate}{burst}{extra}"

    def as_dict(self) -> dict[str, Any]:
        return {"max_concurrency": self.concurrency,
                "request_rate": "inf" if self.rate is not None and math.isinf(self.rate) else self.rate,
                "burstiness": self.burstiness}


def arrival_gaps(rate: float, burstiness: float, n: int, rng: random.Random) -> list[float]:
    """Gaps between arrivals: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate
    (the same process as `vllm bench serve --burstiness`)."""
    if math.isinf(rate):
        return [0.0] * n
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(n)]


def connector() -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)


async def run(endpoint: Endpoint, bodies: Sequence[dict[str, Any]], pattern: Pattern,
              duration_s: float | None = None, seed: int = 0,
              on_done: Callable[[RequestRecord], None] | None = None,
              stop: Callable[[], bool] | None = None, clock: Clock = REAL_CLOCK,
              sender: Sender = send) -> list[RequestRecord]:
    """Send `bodies` in order under `pattern` (each with `sender`); stop issuing new ones after
    `duration_s` on `clock` or once `stop()` is true.

    Requests in flight at the deadline are awaited and counted: cutting them off would bias
    the latency figures towards short requests.
    """
    records: list[RequestRecord] = []
    deadline = None if duration_s is None else clock.now() + duration_s
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector(), timeout=timeout) as session:

        async def one(index: int) -> None:
            record = await sender(session, endpoint, bodies[index], RequestRecord(index=index))
            records.append(record)
            if on_done is not None:
                on_done(record)

        def expired() -> bool:
            return (deadline is not None and clock.now() >= deadline) or (stop is not None and stop())

        if pattern.rate is None:
            queue = iter(range(len(bodies)))

            async def worker() -> None:
                for index in queue:
                    if expired():
                        return
                    await one(index)

            await asyncio.gather(*(worker() for _ in range(pattern.concurrency or 1)))
            return records

        gaps = arrival_gaps(pattern.rate, pattern.burstiness, len(bodies), random.Random(seed))
        limit = asyncio.Semaphore(pattern.concurrency) if pattern.concurrency else None

        async def limited(index: int) -> None:
            if limit is None:
                await one(index)
                return
            async with limit:
                await one(index)

        tasks = []
        next_at = clock.now()
        for index, gap in enumerate(gaps):
            next_at += gap
            delay = next_at - clock.now()
            if delay > 0:
                await clock.sleep(delay)  # the arrival process itself, not synchronisation
            if expired():
                break
            tasks.append(asyncio.create_task(limited(index)))
        await asyncio.gather(*tasks)
    return records
