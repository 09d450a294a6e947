"""Readiness means "this proxy can serve": one model without a usable backend leaves /ready at 200
(its detail in the body) and answers its own requests 503 naming it, while the other models keep
answering. Before, /ready answered 503 as soon as any model had no healthy backend, and the
chart's readinessProbe then took every proxy pod out of its Service. Also: not ready before
startup, and the health loop logs a round that failed rather than swallowing it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import httpx
import pytest
from prometheus_client import CollectorRegistry
from yarl import URL

from serving.app import ProxyApp
from serving.backend import Backend
from serving.config import ModelEntry, ProxyConfig
from serving.metrics import Metrics
from serving.resources import ThrottledLog
from serving.routing import ModelBackends, health_loop
from serving.upstream import Upstream
from tests.conftest import Service, free_port
from tests.serving.asgi_client import call


@pytest.mark.e2e
def test_one_model_down_leaves_the_proxy_ready_and_the_others_serving(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    tiny = [upstream(), upstream()]
    instruct = upstream()
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [b.base_url for b in tiny]},
                                {"profile": "qwen3-4b-instruct-fp8", "backends": [instruct.base_url]},
                                {"profile": "qwq-32b", "backends": dead}],
                     "health_interval_seconds": 0.2}, ready_path="/health")
    ready = httpx.get(f"{service.base_url}/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True, "draining": False, "models": {
        "tiny-qwen3": {"healthy": 2, "ejected": 0, "backends": {b.base_url: "up" for b in tiny}},
        "qwen3-4b-instruct": {"healthy": 1, "ejected": 0, "backends": {instruct.base_url: "up"}},
        "qwq-32b": {"healthy": 0, "ejected": 0, "backends": {url: "down" for url in dead}}}}

    def ask(model: str) -> httpx.Response:
        return httpx.post(f"{service.base_url}/v1/chat/completions", timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})

    assert ask("tiny").status_code == 200
    assert ask("qwen3-4b-instruct").status_code == 200
    down = ask("qwq-32b")
    assert down.status_code == 503 and down.headers["retry-after"]
    assert "no healthy backend for model 'qwq-32b'" in down.json()["error"]["message"]
    metrics = httpx.get(f"{service.base_url}/metrics", timeout=10).text
    assert f'qwen_proxy_backend_up{{backend="{dead[0]}",model="qwq-32b"}} 0.0' in metrics
    assert f'qwen_proxy_backend_up{{backend="{instruct.base_url}",model="qwen3-4b-instruct"}} 1.0' in metrics


def test_not_ready_before_startup_nor_while_draining() -> None:
    async def scenario() -> list[int]:
        app = ProxyApp(ProxyConfig.model_validate({"models": [{"profile": "tiny-qwen3",
                                                               "backends": ["http://127.0.0.1:9"]}]}))
        before, _ = await call(app, "GET", "/ready")
        await app.startup()
        try:
            started, _ = await call(app, "GET", "/ready")  # its only backend is down: still ready
            app.draining = True
            draining, _ = await call(app, "GET", "/ready")
        finally:
            await app.shutdown()
        return [before, started, draining]

    assert asyncio.run(scenario()) == [503, 200, 503]


class FailingOnce:
    """An Upstream whose first health round raises (a bug, say); the next one answers."""

    def __init__(self) -> None:
        self.rounds = 0
        self.second = asyncio.Event()

    async def healthy(self, _base: URL) -> bool:
        self.rounds += 1
        if self.rounds == 1:
            raise RuntimeError("boom in a health round")
        self.second.set()
        return True


def test_the_health_loop_logs_a_failed_round_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        entry = ModelEntry.model_validate({"profile": "tiny-qwen3", "backends": ["http://10.0.0.1:8000"]})
        model = ModelBackends("m", entry, Metrics(CollectorRegistry()))
        model.set_backends([Backend("http://10.0.0.1:8000")])
        fake = FailingOnce()
        loop = asyncio.create_task(health_loop(cast(Upstream, fake), [model], 0, ThrottledLog()))
        try:
            await asyncio.wait_for(fake.second.wait(), 30)
        finally:
            loop.cancel()
        assert model.backends[0].healthy  # the next round went on and decided

    with caplog.at_level(logging.WARNING, "serving"):
        asyncio.run(scenario())
    [record] = [r for r in caplog.records if "health checks failed" in r.getMessage()]
    assert "every backend keeps its last known state" in record.getMessage()
    assert "RuntimeError: boom in a health round" in record.getMessage()  # with its traceback
    assert "Traceback" in record.getMessage()
