"""One request's exchange with a backend: choice, retry before any byte, relay, failures.

A connection failure before anything was sent to the client is retried on another healthy
backend; once the response has started, never (the client would get a spliced answer).

A streamed response is relayed inside the backend connection's `data_received`: each read goes
through the relay and onto the client's transport in the same turn of the event loop, with no
task switch, future or message object per token. When the client cannot keep up, reading from
the backend pauses until it can.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from serving.errors import ApiError, sse_error_event
from serving.httpclient import BackendConnection, ConnectFailed, ConnectionReset
from serving.httpserver import Headers, Response
from serving.relay import StreamRelay, Usage, rewrite_json_response
from serving.shaping import Shaped
from serving.upstream import Backend, Pool

if TYPE_CHECKING:
    from serving.app import ProxyApp
    from serving.config import Route

SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]
MAX_STALE_RETRIES = 3


class StaleConnection(Exception):
    """The connection failed before the backend answered: safe to send the request again."""


class BackendStalled(Exception):
    """No byte from the backend within the configured time."""


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

    def _our_headers(self) -> Headers:
        if self.shaped is None:
            return []
        headers = []
        if self.shaped.applied:
            headers.append((b"x-qwen-defaults-applied", ",".join(self.shaped.applied).encode()))
        if self.shaped.warnings:
            headers.append((b"x-qwen-warning", "; ".join(self.shaped.warnings).encode()))
        return headers

    async def run(self, response: Response) -> int:
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
                    return await self._with_backend(backend, response)
                except ConnectFailed:
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

    async def _with_backend(self, backend: Backend, response: Response) -> int:
        model = self.route.served_name
        conn: BackendConnection | None = None
        succeeded = False  # then the connection is reused once its body has ended
        try:
            async with asyncio.timeout(self.timeouts.first_byte_seconds) as deadline:
                conn, _ = await backend.connections.connect(self.timeouts.connect_seconds)
                conn.send("POST", self.path, self.body)
                status = await conn.response_head()
                relayed = status == 200 and (self.shaped is None or self.shaped.stream)
                if not relayed:
                    payload = await conn.read_body()  # an error answer, or a whole (non-streamed) answer
            if status != 200:
                result = self._pass_through(conn, status, payload, response)
            elif relayed:
                relay = self._stream_relay() if self.shaped is not None else None
                first_byte_due = deadline.when() or asyncio.get_running_loop().time()
                result = await self._relay(conn, response, relay, first_byte_due)
            else:
                result = self._send_whole(payload, response)
            succeeded = True
            return result
        except TimeoutError:
            return self._failed(backend, "timeout", ApiError(
                504, f"model {model!r} did not answer within {self.timeouts.first_byte_seconds:.0f} s",
                code="upstream_timeout"), response, "the model backend stopped sending: timed out")
        except BackendStalled:
            return self._failed(backend, "timeout", None, response, "the model backend stopped sending: timed out")
        except ConnectionReset as exc:
            if not self.started:
                raise StaleConnection from exc
            return self._failed(backend, "reset", None, response,
                                "the model backend failed mid-response; the answer is incomplete")
        finally:
            if conn is not None:
                if succeeded or conn.complete:
                    conn.finish()
                else:
                    conn.close()  # the backend sees the request end and aborts it (also when the client left)

    def _failed(self, backend: Backend, kind: str, before_start: ApiError | None, response: Response,
                message: str) -> int:
        """After the status line went out, an error can only be an SSE event; then the stream ends."""
        self.metrics.upstream_errors.labels(self.route.served_name, kind).inc()
        if not self.started:
            assert before_start is not None
            raise before_start
        if kind == "reset":
            self.pool.set_health(backend, False)
        response.end(sse_error_event(message, f"upstream_{kind}"))
        return 200

    def _send_whole(self, payload: bytes, response: Response) -> int:
        """A non-streamed answer: the name the client asked for put back, its usage counted."""
        usage = Usage()
        body = rewrite_json_response(payload, self.route.served_name, self.route.name, usage)
        usage.record(self.metrics, self.route.served_name)
        self.started = True
        response.send(200, [(b"content-type", b"application/json"), *self._our_headers()], body)
        return 200

    def _pass_through(self, conn: BackendConnection, status: int, payload: bytes, response: Response) -> int:
        """A backend's error answer goes to the client unchanged."""
        if status >= 500:
            self.metrics.upstream_errors.labels(self.route.served_name, "http_5xx").inc()
        self.started = True
        content_type = conn.header(b"content-type") or b"application/json"
        response.send(status, [(b"content-type", content_type)], payload)
        return status

    def _stream_relay(self) -> StreamRelay:
        assert self.shaped is not None
        rewrite = None
        if self.route.name != self.route.served_name:
            rewrite = (f'"model":"{self.route.served_name}"'.encode(), f'"model":"{self.route.name}"'.encode())
        return StreamRelay(self.metrics, self.route.served_name, self.start,
                           drop_usage=not self.shaped.client_wants_usage, rewrite=rewrite,
                           completions=self.path.endswith("/completions") and "chat" not in self.path)

    async def _relay(self, conn: BackendConnection, response: Response, relay: StreamRelay | None,
                     first_byte_due: float) -> int:
        """Forward the body as it arrives: SSE through the relay, other bodies untouched.

        Returns at the stream's [DONE] (clients may close as soon as they read it); the rest of
        the backend's body is read and dropped so its keep-alive connection is reused."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        self.started = True
        if relay is None:
            content_type = conn.header(b"content-type") or b"application/json"
            response.start(200, [(b"content-type", content_type)])
        else:
            response.start(200, [*SSE_HEADERS, *self._our_headers()])
        write, end = response.write, response.end

        def on_data(data: bytes) -> None:
            if ended.done():
                return  # after [DONE]: the backend's end of body, dropped
            if relay is None:
                write(data)
                return
            out = relay.feed(data)
            if relay.saw_done:
                # Count and finish at [DONE], not at the backend's end of body: a client may
                # close its connection as soon as it reads [DONE].
                relay.usage.record(self.metrics, self.route.served_name)
                end(out + relay.leftover())
                ended.set_result(None)
            elif out:
                write(out)

        def on_end(error: Exception | None) -> None:
            if ended.done():
                return
            if error is None and relay is None:
                end()
                ended.set_result(None)
            else:
                # vLLM always ends a stream with [DONE]: a body without it was cut by the backend.
                ended.set_exception(error or ConnectionReset("stream ended without [DONE]"))

        response.on_pause, response.on_resume = conn.pause_reading, conn.resume_reading
        conn.stream(on_data, on_end)
        watchdog = _Watchdog(loop, conn, ended, first_byte_due, self.timeouts.idle_seconds)
        try:
            await ended
        finally:
            watchdog.cancel()
            response.on_pause = response.on_resume = None
        if not conn.complete:
            conn.resume_reading()
            # A backend that never ends its body after [DONE] must not hold the connection forever.
            loop.call_later(self.timeouts.idle_seconds, _close_if_still_unfinished, conn, conn.requests)
        return 200


def _close_if_still_unfinished(conn: BackendConnection, request: int) -> None:
    # Only if the connection still carries that request (not a later one, once reused).
    if conn.requests == request and not conn.complete and not conn.closed:
        conn.close()


class _Watchdog:
    """Fails a relay whose backend goes silent: no body byte by `first_byte_due` (the request's
    first-byte deadline), then `idle` seconds between reads. One timer per period, not one per
    read: reads only stamp a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: BackendConnection, ended: asyncio.Future[None],
                 first_byte_due: float, idle: float) -> None:
        self.loop, self.conn, self.ended = loop, conn, ended
        self.first_byte_due, self.idle = first_byte_due, idle
        self.handle = loop.call_at(self._next_check(), self._check)

    def _due(self) -> float:
        if self.conn.body_seen:
            return self.conn.last_data + self.idle
        return self.first_byte_due

    def _check(self) -> None:
        if self.ended.done():
            return
        if self.loop.time() >= self._due():
            self.ended.set_exception(BackendStalled())
        else:
            self.handle = self.loop.call_at(self._next_check(), self._check)

    def _next_check(self) -> float:
        # Before the first body byte the idle rule does not apply yet, but it will as soon as
        # the body starts: look again within `idle`.
        return min(self._due(), self.loop.time() + self.idle)

    def cancel(self) -> None:
        self.handle.cancel()
