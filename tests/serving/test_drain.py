"""A rolling update as Kubernetes runs it drops no request.

The order modelled: the pod's endpoint is removed from the Service (the chart's preStop pause
gives kube-proxy and ingresses the time to see it), so NEW connections go to another replica, while
connections already open to the old pod keep being used; then the old pod gets SIGTERM. Clients
here send continuously (several at once, streams and short requests, each on a kept-alive
connection) through a TCP "Service" that switches new connections from proxy A to proxy B before
A gets SIGTERM. Every request must succeed: none refused, none answered 503, every stream whole;
A must finish the streams it had, close its connections, and exit 0.

Synchronised on events (a stream's first event, a sender's answers), A's log line and A's exit;
the backend holds the streams in flight until the test releases them, so they are in flight at
SIGTERM whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import Service, wait_until

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "x"}]
TOKENS = 5
DRAINING = "draining (signal received)"


class ClusterService:
    """What a Kubernetes Service does to connections: a new one goes to the current endpoint and
    stays there; switching the endpoint moves only connections opened afterwards."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.opened: list[int] = []  # the target of each connection, in order
        self.refused = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        target = self.target
        self.opened.append(target)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            self.refused += 1
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()  # one side ended: so does the other (HTTP needs no half-close here)


@dataclass
class Outcome:
    kind: str
    status: int = 0
    closing: bool = False  # the answer said `connection: close`
    complete: bool = False
    error: str = ""


async def one(client: httpx.AsyncClient, kind: str, script: str = "") -> Outcome:
    stream = kind != "short"
    body: dict[str, object] = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": TOKENS if stream else 2,
                               "stream": stream}
    if script:
        body["script"] = script
    outcome = Outcome(kind)
    try:
        async with client.stream("POST", CHAT, json=body) as response:
            outcome.status = response.status_code
            outcome.closing = response.headers.get("connection", "").lower() == "close"
            if stream:
                lines = [line async for line in response.aiter_lines() if line]
                outcome.complete = lines[-1:] == ["data: [DONE]"] and len(lines) == TOKENS + 1
            else:
                data = json.loads(await response.aread())
                outcome.complete = data.get("usage", {}).get("completion_tokens") == 2
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def keep_alive_client(service: ClusterService) -> httpx.AsyncClient:
    # One connection per client, kept alive between requests (as an SDK's pool does per host).
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}", timeout=60,
                             limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=60))


@dataclass
class Sender:
    kind: str
    outcomes: list[Outcome] = field(default_factory=list)
    answered: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, service: ClusterService, stop: asyncio.Event) -> None:
        """Back to back until `stop`, then one more (it proves B takes it)."""
        async with keep_alive_client(service) as client:
            while True:
                last = stop.is_set()
                self.outcomes.append(await one(client, self.kind))
                self.answered.set()
                if last:
                    return


def two_proxies(proxy: Callable[..., Service], backend: Service) -> tuple[Service, Service]:
    config = {"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}], "drain_seconds": 120,
              "health_interval_seconds": 0.5}
    return proxy(config), proxy(config)


def release(backend: Service, gate: str) -> None:
    assert httpx.post(f"{backend.base_url}/admin/release", params={"gate": gate}, timeout=10).status_code == 200


def test_a_rolling_update_drops_no_request(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    backend = upstream(delay_ms=10)
    old, new = two_proxies(proxy, backend)
    senders = [Sender(kind) for kind in ("stream", "stream", "stream", "short", "short", "short")]

    async def main() -> tuple[ClusterService, list[Outcome], bool]:
        service = ClusterService(old.port)
        await service.start()
        stop = asyncio.Event()
        # Streams the backend holds after their first event: in flight at A across SIGTERM.
        held_clients = [keep_alive_client(service) for _ in range(2)]
        first_events = [asyncio.Event() for _ in held_clients]

        async def held(client: httpx.AsyncClient, seen: asyncio.Event) -> Outcome:
            body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": TOKENS, "stream": True,
                    "script": "hold=drain"}
            outcome = Outcome("held")
            async with client.stream("POST", CHAT, json=body) as response:
                outcome.status = response.status_code
                lines = []
                async for line in response.aiter_lines():
                    if line:
                        lines.append(line)
                        seen.set()
                outcome.complete = lines[-1:] == ["data: [DONE]"] and len(lines) == TOKENS + 1
            return outcome

        held_tasks = [asyncio.create_task(held(client, seen)) for client, seen in zip(held_clients, first_events)]
        tasks = [asyncio.create_task(sender.run(service, stop)) for sender in senders]
        await asyncio.gather(*(event.wait() for event in first_events))
        await asyncio.gather(*(sender.answered.wait() for sender in senders))  # every client holds a connection to A
        assert service.opened == [old.port] * (len(senders) + len(held_clients))

        service.target = new.port  # the endpoint is removed: new connections go to B from now on
        old.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: DRAINING in old.log(), 30, "the old proxy to start draining")
        for sender in senders:  # every sender is answered again while A drains
            sender.answered.clear()
        await asyncio.gather(*(sender.answered.wait() for sender in senders))
        running_at_release = old.process.poll() is None
        release(backend, "drain")
        held_outcomes = await asyncio.gather(*held_tasks)
        # A exits once its streams are done and its connections closed (the held clients' idle
        # ones by A itself); its exit is the event, bounded for failure only.
        await asyncio.to_thread(old.process.wait, 60)
        stop.set()
        await asyncio.gather(*tasks)
        for client in held_clients:
            await client.aclose()
        await service.close()
        return service, list(held_outcomes), running_at_release

    service, held_outcomes, running_at_release = asyncio.run(main())

    outcomes = [o for sender in senders for o in sender.outcomes] + held_outcomes
    failed = [o for o in outcomes if o.error or o.status != 200 or not o.complete]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed, e.g. {failed[:3]}"
    assert service.refused == 0
    assert running_at_release, "the old proxy exited with streams in flight"
    assert old.process.returncode == 0
    assert "drained: nothing in flight, no client connection open; exiting" in old.log()
    # Each sender's connection to A ended with one answer saying `connection: close`, and the sender
    # moved to B on a new connection; B, not draining, never says it.
    for sender in senders:
        assert [o.closing for o in sender.outcomes].count(True) == 1, sender
    assert service.opened == [old.port] * (len(senders) + 2) + [new.port] * len(senders)


def test_requests_arriving_while_draining_are_served_and_idle_connections_closed(
        proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    backend = upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}], "drain_seconds": 120})
    url = f"{service.base_url}{CHAT}"
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": TOKENS, "stream": True, "script": "hold=one"}

    async def main() -> tuple[Outcome, httpx.Response, httpx.Response, bytes]:
        async with httpx.AsyncClient(timeout=60) as client:
            first = asyncio.Event()

            async def stream() -> Outcome:
                outcome = Outcome("held")
                async with client.stream("POST", url, json=body) as response:
                    lines = []
                    async for line in response.aiter_lines():
                        if line:
                            lines.append(line)
                            first.set()
                    outcome.status = response.status_code
                    outcome.complete = lines[-1:] == ["data: [DONE]"] and len(lines) == TOKENS + 1
                return outcome

            held = asyncio.create_task(stream())
            await first.wait()
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)  # a kept-alive idle client
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await reader.readuntil(b'{"status":"ok"}')
            assert answer.startswith(b"HTTP/1.1 200 ")

            service.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until, lambda: DRAINING in service.log(), 30, "the drain to start")
            async with httpx.AsyncClient(timeout=30) as other:
                ready = await other.get(f"{service.base_url}/ready")
                late = await other.post(url, json={"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": 2})
            # The idle connection is closed by the proxy after a short idle time: read until it is.
            closed = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            release(backend, "one")
            return await held, ready, late, closed

    held, ready, late, closed = asyncio.run(main())
    assert ready.status_code == 503 and ready.json()["draining"] is True
    assert late.status_code == 200 and late.headers["connection"] == "close"  # served, not 503
    assert closed == b""
    assert held.status == 200 and held.complete
    assert service.process.wait(timeout=60) == 0


def test_a_second_signal_exits_at_once(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> None:
    backend = upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}], "drain_seconds": 3600})
    body = {"model": "tiny-qwen3", "messages": MESSAGES, "max_tokens": TOKENS, "stream": True, "script": "hold=never"}

    async def main() -> Outcome:
        async with httpx.AsyncClient(timeout=60) as client:
            outcome = Outcome("held")
            try:
                async with client.stream("POST", f"{service.base_url}{CHAT}", json=body) as response:
                    lines = []
                    async for line in response.aiter_lines():
                        if line:
                            lines.append(line)
                            if len(lines) == 1:  # in flight: now stop the proxy, twice
                                service.process.send_signal(signal.SIGTERM)
                                await asyncio.to_thread(wait_until, lambda: DRAINING in service.log(), 30, "drain")
                                service.process.send_signal(signal.SIGTERM)
                    outcome.complete = lines[-1:] == ["data: [DONE]"]
            except httpx.HTTPError as exc:
                outcome.error = type(exc).__name__
            return outcome

    outcome = asyncio.run(main())
    assert service.process.wait(timeout=30) is not None  # did not wait for drain_seconds (an hour)
    assert not outcome.complete  # the stream held by the backend was cut
