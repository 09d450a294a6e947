"""The proxy's ASGI application and a scripted upstream on one event loop, in the test's process.

Fast and deterministic enough for property tests (a request is a call, not an HTTP exchange with a
server process), and a test can change the application (inject a fault, a clock, a resolver).
Requests reach the application as uvicorn would hand them over (the scope the proxy's protocol
builds, its `Hangup` included); answers are the ASGI messages it sends.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from benchmarks.scripted_upstream import make_app
from serving.app import ProxyApp
from serving.config import ProxyConfig
from serving.http_io import HANGUP, Hangup, Message


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool  # the last body message was sent (more_body false)
    aborted: bool = False  # the application closed the connection (Hangup.abort)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        return [line for line in self.body.decode().split("\n") if line]


@dataclass
class FakeCycle:
    """What Hangup.abort touches of uvicorn's request-response cycle."""

    disconnected: bool = False
    closed: list[bool] = field(default_factory=list)

    @property
    def transport(self) -> FakeCycle:
        return self

    def close(self) -> None:
        self.closed.append(True)


async def call(app: ProxyApp, method: str, path: str, body: bytes = b"",
               headers: list[tuple[bytes, bytes]] | None = None,
               client: tuple[str, int] | None = ("127.0.0.1", 50000)) -> Answer:
    hangup = Hangup()
    cycle = FakeCycle()
    hangup.cycle = cycle
    target, _, query = path.partition("?")
    scope = {"type": "http", "http_version": "1.1", "method": method, "path": target,
             "raw_path": target.encode(), "query_string": query.encode(), "client": client,
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                         *(headers or [])],
             "extensions": {HANGUP: hangup}}
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            await asyncio.Event().wait()  # the proxy never waits here: its Hangup says when a client left
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        if cycle.disconnected:
            return  # as uvicorn: nothing more once the connection is aborted
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    parts = [m for m in sent if m["type"] == "http.response.body"]
    return Answer(start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
                  b"".join(m.get("body", b"") for m in parts),
                  bool(parts) and not parts[-1].get("more_body", False), aborted=bool(cycle.closed))


class Stack:
    """A scripted upstream (aiohttp, on a free port) and a proxy application in front of it."""

    def __init__(self, upstream: dict[str, Any] | None = None) -> None:
        self.upstream_options = upstream or {}
        self.runner: web.AppRunner | None = None
        self.app: ProxyApp | None = None
        self.base_url = ""

    async def start_upstream(self) -> str:
        self.runner = web.AppRunner(make_app(**self.upstream_options), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self.base_url

    async def start(self, config: dict[str, Any], **app_options: Any) -> ProxyApp:
        self.app = ProxyApp(ProxyConfig.model_validate(config), registry=CollectorRegistry(), **app_options)
        await self.app.startup()
        return self.app

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.base_url}/stats") as response:
            return await response.json()  # type: ignore[no-any-return]

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.shutdown()
        if self.runner is not None:
            await self.runner.cleanup()
