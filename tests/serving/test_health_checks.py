"""Health probes: one kept-alive connection per backend, and a dropped one is never taken for a
backend that is down."""

from __future__ import annotations

import asyncio

from aiohttp import web
from yarl import URL

from serving.upstream import Upstream


async def probed(health: int, drop_reused: bool, probes: int,
                 interval: float = 2.0) -> tuple[list[bool | None], dict[object, int]]:
    """Probe a backend `probes` times; what each probe said, and the /health requests per connection."""
    served: dict[object, int] = {}

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        served[peer] = served.get(peer, 0) + 1
        if drop_reused and served[peer] > 1:
            request.transport.close()  # the backend closes a kept-alive connection under its client
        return web.Response(status=health)

    app = web.Application()
    app.router.add_get("/health", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    upstream = Upstream(health_interval=interval)
    try:
        results = [await upstream.healthy(URL(f"http://127.0.0.1:{port}")) for _ in range(probes)]
    finally:
        await upstream.close()
        await runner.cleanup()
    return results, served


def test_probes_share_one_kept_alive_connection() -> None:
    results, served = asyncio.run(probed(200, drop_reused=False, probes=4))
    assert results == [True] * 4
    assert list(served.values()) == [4]  # one connection carried every probe


def test_probes_further_apart_than_the_keep_alive_connect_each_time() -> None:
    """A connection idle until the next probe would be dropped first: it is not kept."""
    results, served = asyncio.run(probed(200, drop_reused=False, probes=3, interval=10.0))
    assert results == [True] * 3 and list(served.values()) == [1, 1, 1]


def test_a_dropped_kept_alive_connection_is_not_a_backend_down() -> None:
    """The second probe's connection is closed by the backend: it is made again on a fresh
    connection, which answers, so the backend stays up."""
    results, served = asyncio.run(probed(200, drop_reused=True, probes=2))
    assert results == [True, True]
    assert sorted(served.values()) == [1, 2]  # the dropped probe, then the fresh connection's


def test_a_backend_that_answers_unhealthy_is_down() -> None:
    results, served = asyncio.run(probed(503, drop_reused=False, probes=2))
    assert results == [False, False] and list(served.values()) == [2]
