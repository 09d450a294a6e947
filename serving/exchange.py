"""One request's exchange with a backend: choice, retry before any byte, relay, failures.

A connection failure before anything was sent to the client is retried on another healthy
backend; once the response has started, never (the client would get a spliced answer).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from serving.errors import ApiError, sse_error_event
from serving.relay import StreamRelay, Usage, rewrite_json_response
from serving.shaping import Shaped
from serving.upstream import Backend, Pool

if TYPE_CHECKING:
    from serving.app import ProxyApp
    from serving.config import Route

Send = Callable[[dict[str, Any]], Awaitable[None]]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
UPSTREAM_HEADERS = {"content-type": "application/json"}
MAX_STALE_RETRIES = 3


class StaleConnection(Exception):
    """The connection failed before the backend answered: safe to send the request again."""


class Exchange:
    def __init__(self, app: ProxyApp, route: Route, pool: Pool, path: str, shaped: Shaped | None,
                 raw: bytes, start: float) -> None:
        self.app = app
        self.metrics = app.metrics
        self.route = route
        self.pool = pool
        self.path = path
        self.shaped = shaped
        self.body = json.dumps(shaped.body).encode() if shaped is not None else raw
        self.start = start
        self.timeouts = route.entry.timeouts
        self.started = False  # response start sent to the client: no retry after this
        self.send: Send

    def _our_headers(self) -> list[tuple[bytes, bytes]]:
        if self.shaped is None:
            return []
        headers = []
        if self.shaped.applied:
            headers.append((b"x-qwen-defaults-applied", ",".join(self.shaped.applied).encode()))
        if self.shaped.warnings:
            headers.append((b"x-qwen-warning", "; ".join(self.shaped.warnings).encode()))
        return headers

    async def run(self, send: Send) -> int:
        self.send = send
        model = self.route.served_name
        in_flight = self.metrics.in_flight.labels(model)
        in_flight.inc()
        excluded: set[Backend] = set()
        stale_retries = 0
        try:
            while True:
                backend = self.pool.pick(excluded)
                if backend is None:
                    detail = "all backends failed for this request" if excluded else "none is healthy"
                    raise ApiError(503, f"no healthy backend for model {model!r} ({detail}); retry later",
                                   headers={"retry-after": "2"})
                backend.in_flight += 1
                try:
                    return await self._with_backend(backend, send)
                except aiohttp.ClientConnectorError:
                    # Nothing listens there: the backend is down for everyone until its /health answers.
                    self.metrics.upstream_errors.labels(model, "connect").inc()
                    self.pool.set_health(backend, False)
                    excluded.add(backend)
                except StaleConnection:
                    # A pooled keep-alive connection the backend had closed: routine, not a dead
                    # backend. Retry on a fresh connection; give up on this backend after a few.
                    stale_retries += 1
                    if stale_retries >= MAX_STALE_RETRIES:
                        self.metrics.upstream_errors.labels(model, "reset").inc()
                        excluded.add(backend)
                finally:
                    backend.in_flight -= 1
        finally:
            in_flight.dec()

    async def _with_backend(self, backend: Backend, send: Send) -> int:
        model = self.route.served_name
        session = self.app.session
        assert session is not None, "the proxy is not started"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_seconds)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeouts.first_byte_seconds) as deadline:
                async with session.post(backend.url + self.path, data=self.body, headers=UPSTREAM_HEADERS,
                                        timeout=timeout) as response:
                    if response.status != 200:
                        return await self._pass_through(response, send)
                    if self.shaped is not None and self.shaped.stream:
                        return await self._stream(response, send, deadline, loop)
                    if self.shaped is None:
                        return await self._raw(response, send, deadline, loop)
                    payload = await response.read()
        except TimeoutError:
            self.metrics.upstream_errors.labels(model, "timeout").inc()
            if self.started:
                await self._end_stream_with_error("the model backend stopped sending: timed out", "upstream_timeout")
                return 200
            raise ApiError(504, f"model {model!r} did not answer within {self.timeouts.first_byte_seconds:.0f} s",
                           code="upstream_timeout") from None
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            if not self.started:
                raise StaleConnection from exc
            self.metrics.upstream_errors.labels(model, "reset").inc()
            self.pool.set_health(backend, False)
            await self._end_stream_with_error("the model backend failed mid-response; the answer is incomplete",
                                              "upstream_reset")
            return 200
        usage = Usage()
        body = rewrite_json_response(payload, self.route.served_name, self.route.name, usage)
        usage.record(self.metrics, model)
        self.started = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *self._our_headers()]})
        await send({"type": "http.response.body", "body": body})
        return 200

    async def _pass_through(self, response: aiohttp.ClientResponse, send: Send) -> int:
        """A backend's error answer goes to the client unchanged."""
        payload = await response.read()
        if response.status >= 500:
            self.metrics.upstream_errors.labels(self.route.served_name, "http_5xx").inc()
        self.started = True
        content_type = response.headers.get("content-type", "application/json").encode()
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
        return response.status

    async def _stream(self, response: aiohttp.ClientResponse, send: Send, deadline: asyncio.Timeout,
                      loop: asyncio.AbstractEventLoop) -> int:
        assert self.shaped is not None
        rewrite = None
        if self.route.name != self.route.served_name:
            rewrite = (f'"model":"{self.route.served_name}"'.encode(), f'"model":"{self.route.name}"'.encode())
        relay = StreamRelay(self.metrics, self.route.served_name, self.start,
                            drop_usage=not self.shaped.client_wants_usage, rewrite=rewrite,
                            completions=self.path.endswith("/completions") and "chat" not in self.path)
        self.started = True
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *self._our_headers()]})
        idle = self.timeouts.idle_seconds
        content = response.content
        while not relay.saw_done:
            data = await content.readany()
            if not data:
                # vLLM always ends with [DONE]: a stream without it was cut by the backend.
                raise aiohttp.ClientPayloadError("stream ended without [DONE]")
            deadline.reschedule(loop.time() + idle)
            out = relay.feed(data)
            if relay.saw_done:
                # Count and finish at [DONE], not at the backend's end of body: a client may
                # close its connection as soon as it reads [DONE], which cancels this exchange.
                relay.usage.record(self.metrics, self.route.served_name)
                out += relay.leftover()
                await send({"type": "http.response.body", "body": out, "more_body": False})
            elif out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        # Drain the backend's end of body so its keep-alive connection is reused.
        while await content.readany():
            pass
        return 200

    async def _raw(self, response: aiohttp.ClientResponse, send: Send, deadline: asyncio.Timeout,
                   loop: asyncio.AbstractEventLoop) -> int:
        """Other /v1 endpoints: bytes through, untouched."""
        self.started = True
        headers = [(b"content-type", response.headers.get("content-type", "application/json").encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for data in response.content.iter_any():
            deadline.reschedule(loop.time() + self.timeouts.idle_seconds)
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200

    async def _end_stream_with_error(self, message: str, code: str) -> None:
        """After the status line went out, an error can only be an SSE event; then the stream ends."""
        await self.send({"type": "http.response.body", "body": sse_error_event(message, code), "more_body": False})
