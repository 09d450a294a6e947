"""Outlier ejection end to end: the proxy application (driven over ASGI in this process, with a clock
the test moves) in front of two real HTTP upstreams on loopback, one answering 500 to every
generation while its /health is fine. After five failures it gets no more requests; a client's
4xx never ejects; after the cool-down exactly one request reaches it; when that one succeeds it is
back. Before, the broken backend kept half the requests (50 of 100 failed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from benchmarks.scripted_upstream import make_app
from serving.app import ProxyApp
from serving.config import ProxyConfig
from tests.serving.asgi_client import call

MODEL = "tiny-qwen3"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Broken:
    """/health answers 200; every generation 500 (as a wedged engine does) until `status` changes.
    While `gate` is set, a generation waits for it before answering."""

    def __init__(self) -> None:
        self.requests = 0
        self.status = 500
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def generate(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.json_response({"error": {"message": "EngineCore encountered an issue",
                                                "type": "InternalServerError", "code": 500}}, status=500)
        return web.json_response({"id": "x", "object": "chat.completion", "model": MODEL, "usage": None,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}]})


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@asynccontextmanager
async def stack(broken: Broken | None, clock: Clock | None = None) -> AsyncIterator[tuple[ProxyApp, list[str]]]:
    """The proxy in front of [broken (or a second good one), good]."""
    first = web.Application()
    if broken is not None:
        first.router.add_get("/health", broken.health)
        first.router.add_post("/v1/chat/completions", broken.generate)
    else:
        first = make_app()
    runners = []
    urls = []
    for app in (first, make_app()):
        runner, url = await serve(app)
        runners.append(runner)
        urls.append(url)
    config = ProxyConfig.model_validate({"models": [{"profile": MODEL, "backends": urls}],
                                         "health_interval_seconds": 3600})
    proxy = ProxyApp(config, clock=clock) if clock is not None else ProxyApp(config)
    await proxy.startup()
    try:
        yield proxy, urls
    finally:
        await proxy.shutdown()
        for runner in runners:
            await runner.cleanup()


async def chat(app: ProxyApp, conversation: int, **extra: object) -> int:
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": f"conversation {conversation}"}],
            **extra}
    status, _ = await call(app, "POST", "/v1/chat/completions", body)
    return status


async def state(app: ProxyApp) -> dict[str, Any]:
    status, body = await call(app, "GET", "/ready")
    assert status == 200
    model: dict[str, Any] = json.loads(body)["models"][MODEL]
    return model


def test_a_backend_failing_every_generation_is_ejected_after_five() -> None:
    async def scenario() -> tuple[list[int], int]:
        broken = Broken()
        async with stack(broken) as (app, _):
            statuses = [await chat(app, i) for i in range(100)]
            return statuses, broken.requests

    statuses, reached_broken = asyncio.run(scenario())
    assert (statuses.count(500), statuses.count(200)) == (5, 95)
    assert reached_broken == 5


def test_a_clients_4xx_never_ejects() -> None:
    async def scenario() -> tuple[list[int], dict[str, Any]]:
        async with stack(None) as (app, _):
            statuses = [await chat(app, i, script="reject") for i in range(30)]  # the engine's 400, 30 in a row
            return statuses, await state(app)

    statuses, model = asyncio.run(scenario())
    assert statuses == [400] * 30
    assert model["ejected"] == 0 and set(model["backends"].values()) == {"up"}


def test_after_the_cool_down_one_trial_request_and_recovery() -> None:
    async def until_broken_gets_one(app: ProxyApp, broken: Broken, first: int) -> tuple[asyncio.Task[int], int]:
        """New conversations one after the other until one reaches the broken backend (its trial),
        which is left waiting there; the task of that one and how many were sent."""
        broken.arrived.clear()
        arrived = asyncio.create_task(broken.arrived.wait())
        for sent in range(1, 41):
            request = asyncio.create_task(chat(app, first + sent))
            await asyncio.wait([request, arrived], return_when=asyncio.FIRST_COMPLETED)
            if broken.arrived.is_set():
                return request, sent
            assert request.result() == 200
        raise AssertionError("no request reached the backend after its cool-down")

    async def scenario() -> None:
        clock = Clock()
        broken = Broken()
        async with stack(broken, clock) as (app, urls):
            sent = 0
            while (await state(app))["ejected"] == 0:
                assert sent < 40, "never ejected"
                await chat(app, sent)
                sent += 1
            assert broken.requests == 5
            assert (await state(app))["backends"] == {urls[0]: "ejected", urls[1]: "up"}

            clock.now += 30  # the first cool-down: base_ejection_seconds
            assert (await state(app))["backends"][urls[0]] == "half_open"
            broken.gate = asyncio.Event()
            trial, sent = await until_broken_gets_one(app, broken, 1000)
            # While the trial is in flight, nothing else goes there.
            assert [await chat(app, 2000 + i) for i in range(10)] == [200] * 10
            assert broken.requests == 6
            broken.gate.set()
            assert await trial == 500  # still broken: out again, for twice as long
            assert (await state(app))["backends"][urls[0]] == "ejected"
            clock.now += 59
            assert (await state(app))["backends"][urls[0]] == "ejected"

            clock.now += 1
            broken.status, broken.gate = 200, None
            trial, _ = await until_broken_gets_one(app, broken, 3000)
            assert await trial == 200
            assert await state(app) == {"healthy": 2, "ejected": 0, "backends": {urls[0]: "up", urls[1]: "up"}}
            before = broken.requests
            assert [await chat(app, 4000 + i) for i in range(10)] == [200] * 10
            assert broken.requests > before  # back in rotation: it takes new conversations again
            exposition = app.metrics.exposition().decode()
            assert f'qwen_proxy_backend_ejections_total{{backend="{urls[0]}",model="{MODEL}"}} 2.0' in exposition

    asyncio.run(scenario())
