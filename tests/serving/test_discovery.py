"""DNS discovery only where asked: with `discover`, each address of a backend's host name is a
backend, and requests to it keep the URL's host name in Host, in TLS (SNI and certificate check)
and its userinfo; without, the URL is one backend as written. A local TLS server (certificates from
trustme) behind a name the injected resolver gives two loopback addresses."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.typedefs import Handler

from benchmarks.scripted_upstream import make_app
from serving.app import ProxyApp
from serving.discovery import discovery_loop, refresh
from serving.upstream import Upstream
from tests.serving.inprocess import Stack, call

NAME = "backend.test"
ADDRESSES = ["127.0.0.1", "127.0.0.2"]
BODY = b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}'


@dataclass
class Seen:
    """What the TLS backend saw of each request: its path, Host, Authorization, the address it came to."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)  # SNI of each TLS handshake


@dataclass
class TlsBackend:
    port: int
    seen: Seen
    client_context: ssl.SSLContext  # trusts the backend's CA
    runner: web.AppRunner


async def tls_backend() -> TlsBackend:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(NAME).configure_cert(server_context)  # valid for the name only, not the addresses
    seen = Seen()
    server_context.sni_callback = lambda _sock, name, _ctx: seen.server_names.append(name)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        assert request.transport is not None
        seen.requests.append({"path": request.path, "host": request.headers.get("Host"),
                              "authorization": request.headers.get("Authorization"),
                              "address": request.transport.get_extra_info("sockname")[0]})
        return await handler(request)

    app = make_app()
    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    first = web.TCPSite(runner, ADDRESSES[0], 0, ssl_context=server_context)
    await first.start()
    port = runner.addresses[0][1]
    await web.TCPSite(runner, ADDRESSES[1], port, ssl_context=server_context).start()
    return TlsBackend(port, seen, client_context, runner)


class Resolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return self.answers[host]


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as running:
        yield running


def test_discovered_addresses_keep_the_host_name_in_host_tls_and_auth(runner: asyncio.Runner) -> None:
    async def main() -> tuple[TlsBackend, list[int], list[str], str]:
        backend = await tls_backend()
        stack = Stack()
        resolver = Resolver({NAME: ADDRESSES})
        app = await stack.start({
            "models": [{"profile": "tiny-qwen3", "backends": [f"https://ops:s3cr%40t@{NAME}:{backend.port}"],
                        "discover": True, "routing": "least_in_flight"}],
            "health_interval_seconds": 3600, "dns_refresh_seconds": 3600,
        }, resolver=resolver, ssl_context=backend.client_context)
        try:
            statuses = [(await call(app, "POST", "/v1/chat/completions", BODY)).status for _ in range(4)]
            urls = [b.url for b in app.backends["tiny"].backends]
            exposition = app.metrics.exposition().decode()
        finally:
            await stack.stop()
            await backend.runner.cleanup()
        return backend, statuses, urls, exposition

    backend, statuses, urls, exposition = runner.run(main())
    assert statuses == [200] * 4
    assert urls == [f"https://{address}:{backend.port}" for address in ADDRESSES]  # no userinfo in a label
    generations = [r for r in backend.seen.requests if r["path"] == "/v1/chat/completions"]
    assert sorted(r["address"] for r in generations) == sorted(ADDRESSES * 2)  # both addresses served
    basic = "Basic " + base64.b64encode(b"ops:s3cr@t").decode()
    for request in backend.seen.requests:  # health probes, /v1/models and generations alike
        assert request["host"] == f"{NAME}:{backend.port}" and request["authorization"] == basic, request
    assert {"/health", "/v1/models"} <= {r["path"] for r in backend.seen.requests}
    # Every TLS handshake named the host (and its certificate, issued for the name only, was verified).
    assert backend.seen.server_names and set(backend.seen.server_names) == {NAME}
    assert "s3cr" not in exposition and "ops:" not in exposition
    assert f'backend="https://127.0.0.2:{backend.port}"' in exposition


def test_without_discover_a_host_name_is_one_backend_as_written(runner: asyncio.Runner) -> None:
    async def main() -> tuple[list[str], Resolver]:
        stack = Stack()
        upstream = await stack.start_upstream()
        port = upstream.rsplit(":", 1)[1]
        resolver = Resolver({"localhost": ADDRESSES})
        app = await stack.start({"models": [{"profile": "tiny-qwen3",
                                             "backends": [f"http://localhost:{port}", f"http://u:p@127.0.0.1:{port}"]}],
                                 "health_interval_seconds": 3600}, resolver=resolver)
        try:
            answer = await call(app, "POST", "/v1/chat/completions", BODY)
            assert answer.status == 200
            return [b.url for b in app.backends["tiny"].backends], resolver
        finally:
            await stack.stop()

    urls, resolver = runner.run(main())
    assert urls[0].startswith("http://localhost:") and urls[1].startswith("http://127.0.0.1:")  # userinfo kept out
    assert resolver.asked == []  # never resolved by the proxy: aiohttp resolves it per connection


def test_the_discovery_loop_says_what_it_swallows_and_keeps_going(runner: asyncio.Runner,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A failing round (here a resolver bug, not a DNS answer) is logged, throttled, and the loop
    goes on; it used to be suppressed without a word."""
    class Broken:
        def __init__(self) -> None:
            self.calls = 0
            self.third = asyncio.Event()

        async def __call__(self, host: str, port: int) -> list[str]:
            self.calls += 1
            if self.calls == 3:
                self.third.set()
            raise RuntimeError("resolver bug")

    async def main() -> None:
        from serving.config import ProxyConfig

        config = ProxyConfig.model_validate({"models": [{"profile": "tiny-qwen3", "backends": [f"http://{NAME}:1"],
                                                         "discover": True}]})
        app = ProxyApp(config)
        upstream = Upstream()
        broken = Broken()
        loop = asyncio.create_task(discovery_loop(upstream, app.models, 0.0, broken))
        try:
            await asyncio.wait_for(broken.third.wait(), 30)  # a failure bound only
            assert not loop.done()
        finally:
            loop.cancel()
            await upstream.close()

    with caplog.at_level(logging.WARNING, logger="serving"):
        runner.run(main())
    failures = [r.getMessage() for r in caplog.records if "DNS discovery round failed" in r.getMessage()]
    assert len(failures) == 1 and "RuntimeError: resolver bug" in failures[0]  # one line per 10 s, not per round


def test_a_name_that_stops_resolving_is_said_once_per_interval_and_keeps_its_addresses(
        runner: asyncio.Runner, caplog: pytest.LogCaptureFixture) -> None:
    """DNS answering 'no such name' round after round: one warning per interval (not one every
    dns_refresh_seconds), and the backends found before stay."""
    class Gone:
        def __init__(self) -> None:
            self.calls = 0
            self.fifth = asyncio.Event()

        async def __call__(self, host: str, port: int) -> list[str]:
            self.calls += 1
            if self.calls == 1:
                return ["127.0.0.2"]
            if self.calls == 5:
                self.fifth.set()
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def main() -> list[str]:
        from serving.config import ProxyConfig

        config = ProxyConfig.model_validate({"models": [{"profile": "tiny-qwen3", "backends": [f"http://{NAME}:1"],
                                                         "discover": True}]})
        app = ProxyApp(config)
        upstream = Upstream()
        gone = Gone()
        [model] = app.models
        try:
            await refresh(upstream, model, gone)  # the first answer: one address
            loop = asyncio.create_task(discovery_loop(upstream, app.models, 0.0, gone))
            await asyncio.wait_for(gone.fifth.wait(), 30)  # a failure bound only
            loop.cancel()
            return [backend.url for backend in model.backends]
        finally:
            await upstream.close()

    with caplog.at_level(logging.WARNING, logger="serving"):
        urls = runner.run(main())
    assert urls == ["http://127.0.0.2:1"]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"cannot resolve {NAME}")]
    assert len(said) == 1 and "keeping its last addresses" in said[0]
