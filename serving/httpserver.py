"""The proxy's HTTP/1.1 server: asyncio protocols and httptools (the parser uvicorn uses).

Why not uvicorn: every streamed token crosses the proxy, and through ASGI each one costs an
awaited `send`, a message dict and a task switch. Here a handler writes straight to the client's
transport, so the streaming relay runs inside the backend connection's `data_received` with no
task switch per token (see exchange.py). The server does what the proxy needs and no more:
keep-alive, pipelined requests answered in order, `Expect: 100-continue`, a body size limit
applied while reading, write backpressure, and the client's disconnect cancelling the handler (so
the backend request is closed at once and vLLM aborts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import unquote

import httptools

from serving.errors import error_body

log = logging.getLogger("serving.httpserver")

Headers = list[tuple[bytes, bytes]]
MAX_HEADER_BYTES = 64 * 1024
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class Request:
    __slots__ = ("body", "body_too_large", "declared_length", "headers", "http11", "keep_alive", "method", "path",
                 "refusal")

    def __init__(self, method: str, path: str, headers: Headers, http11: bool = True) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.http11 = http11
        self.keep_alive = True  # False: the connection closes after this request's response
        self.body = b""
        self.body_too_large = False  # the body went over the limit; it was not read further
        self.declared_length: int | None = None
        self.refusal: tuple[int, str] | None = None  # answered by the server itself, in turn

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Response:
    """Writes one response to the client's transport, synchronously (no await per chunk).

    `start` + `write`* + `end` for a stream (chunked; for an HTTP/1.0 client, raw bytes ended by
    closing the connection), `send` for a whole body. `on_pause` and `on_resume` are called when
    the client stops or resumes reading (its socket buffer is full), so a relay can stop and
    resume reading its backend.
    """

    __slots__ = ("_chunked", "_conn", "_head_only", "_request", "_transport", "finished", "on_pause",
                 "on_resume", "started")

    def __init__(self, conn: HttpConnection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self._transport = conn.transport
        self._head_only = request.method == "HEAD"
        self._chunked = request.http11
        self.started = False
        self.finished = False
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    def _head(self, status: int, headers: Headers, framing: bytes) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))]
        lines.extend(b"%s: %s\r\n" % pair for pair in headers)
        lines.append(framing)
        if not self._request.keep_alive:
            lines.append(b"connection: close\r\n")
        elif not self._request.http11:
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def start(self, status: int, headers: Headers) -> None:
        """The status line and headers of a streamed response."""
        self.started = True
        if self._chunked:
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b""  # HTTP/1.0 has no chunks: the body ends when the connection closes
            self._request.keep_alive = False
        if not self._conn.closed:
            self._transport.write(self._head(status, headers, framing))

    def write(self, data: bytes) -> None:
        # A closed transport raises on write; the client's loss is handled by cancelling the handler.
        if not data or self._head_only or self._conn.closed:
            return
        if self._chunked:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._transport.write(data)

    def end(self, data: bytes = b"") -> None:
        if self.finished:
            return
        self.finished = True
        if self._head_only or self._conn.closed:
            pass
        elif not self._chunked:
            if data:
                self._transport.write(data)
        elif data:
            self._transport.write(b"%x\r\n%b\r\n%b" % (len(data), data, LAST_CHUNK))
        else:
            self._transport.write(LAST_CHUNK)
        self._conn.response_done(self._request)

    def send(self, status: int, headers: Headers, body: bytes) -> None:
        """A whole response with Content-Length."""
        self.started = True
        self.finished = True
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        if not self._conn.closed:
            self._transport.write(head if self._head_only else head + body)
        self._conn.response_done(self._request)


Handler = Callable[[Request, Response], Awaitable[None]]


class HttpConnection(asyncio.Protocol):
    """One client connection: parse requests, answer them in turn (pipelined ones too)."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._response: Response | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._ignoring_input = False  # after a refusal: nothing more is read from this client
        # the request being parsed
        self._in_head = True
        self._head_bytes = 0  # bytes received while this head is unfinished (data_received)
        self._head_size = 0  # the parsed request line and headers (callbacks)
        self._url = b""
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._request: Request | None = None

    @property
    def _busy(self) -> bool:
        return self._task is not None and not self._task.done()

    # ---- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self.server.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        if self._ignoring_input:
            return
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the request was queued with its refusal (on_message_complete)
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head and self._head_bytes > MAX_HEADER_BYTES and not self._ignoring_input:
            # Still no end of the request line and headers: refuse before buffering any more.
            self._refuse(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (a request in progress is cancelled)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._cancel_idle_timer()
        if self._busy and not (self._response and self._response.finished):
            assert self._task is not None
            self._task.cancel()  # the client went away: the backend request is closed at once

    def pause_writing(self) -> None:
        if self._response is not None and self._response.on_pause is not None:
            self._response.on_pause()

    def resume_writing(self) -> None:
        if self._response is not None and self._response.on_resume is not None:
            self._response.on_resume()

    # ---- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_size = 0
        self._url = b""
        self._headers = []
        self._body = []
        self._body_size = 0
        self._request = None

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        parsed = httptools.parse_url(self._url)
        request = Request(self.parser.get_method().decode("ascii", "replace"),
                          unquote(parsed.path.decode("latin-1")), self._headers,
                          http11=self.parser.get_http_version() == "1.1")
        self._request = request
        if self._head_size > MAX_HEADER_BYTES:
            self._refuse(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")
            return
        length = request.header(b"content-length")
        if length is not None and length.isdigit():
            request.declared_length = int(length)
            if request.declared_length > self.server.max_body_bytes:
                self._dispatch_too_large(request)
                return
        expect = request.header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and not self._queue and not self._busy:
            self.transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._ignoring_input:
            return
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            assert self._request is not None
            self._dispatch_too_large(self._request)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        self._in_head = True  # what follows is the next request's head
        self._head_bytes = 0
        if request is None or self._ignoring_input:
            return
        request.body = b"".join(self._body)
        self._body = []
        request.keep_alive = self.parser.should_keep_alive()
        if self.parser.should_upgrade():
            request.refusal = (400, "protocol upgrades are not supported")
            request.keep_alive = False
            self._ignoring_input = True
        self._enqueue(request)

    # ---- requests --------------------------------------------------------------------------------
    def _dispatch_too_large(self, request: Request) -> None:
        """Answer in turn without reading the rest: the handler says 413 and the connection closes."""
        request.body_too_large = True
        request.keep_alive = False
        self._ignoring_input = True
        self._enqueue(request)

    def _refuse(self, status: int, message: str) -> None:
        """Input we cannot parse: answered in turn, after the requests before it; then close."""
        refusal = Request("", "", [])
        refusal.refusal = (status, message)
        refusal.keep_alive = False
        self._ignoring_input = True
        self._enqueue(refusal)

    def _enqueue(self, request: Request) -> None:
        self._cancel_idle_timer()
        self._queue.append(request)
        if self._task is None:
            self._next()

    def _next(self) -> None:
        self._task = None
        self._response = None
        if not self._queue or self.closed:
            if not self.closed:
                self._arm_idle_timer()
            return
        request = self._queue.popleft()
        response = Response(self, request)
        self._response = response
        if request.refusal is not None:
            status, message = request.refusal
            response.send(status, [(b"content-type", b"application/json")], error_body(status, message))
            return
        self._task = self.server.loop.create_task(self._run(request, response))

    async def _run(self, request: Request, response: Response) -> None:
        try:
            await self.server.handler(request, response)
        except asyncio.CancelledError:
            return  # the client went away
        except Exception:  # one request's bug must not take down the connection's others
            log.exception("unhandled error answering %s %s", request.method, request.path)
            if not response.started:
                response.send(500, [(b"content-type", b"application/json")],
                              error_body(500, "internal proxy error"))
        if not response.finished and not self.closed:
            # A started stream the handler could not finish: closing is the only honest end.
            self.transport.close()

    def response_done(self, request: Request) -> None:
        if not request.keep_alive:
            self._queue.clear()
            self.transport.close()
            return
        # The next request runs once this handler returns, on the loop's next turn.
        self.server.loop.call_soon(self._after_response)

    def _after_response(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.add_done_callback(lambda _: self._next())
        else:
            self._next()

    def _arm_idle_timer(self) -> None:
        # Runs while no whole request is waiting: an idle keep-alive connection, or a client that
        # sends part of a request and then nothing.
        self._cancel_idle_timer()
        self._idle_timer = self.server.loop.call_later(self.server.idle_seconds, self.close_if_idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close_if_idle(self) -> None:
        if not self._busy and not self._queue and not self.closed:
            self.transport.close()


class HttpServer:
    def __init__(self, handler: Handler, max_body_bytes: int, idle_seconds: float) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.idle_seconds = idle_seconds
        self.connections: set[HttpConnection] = set()
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None

    async def listen(self, host: str, port: int, share_port: bool = False) -> None:
        """`share_port`: several worker processes bind the same port (SO_REUSEPORT); the kernel
        spreads new connections across them."""
        self._server = await self.loop.create_server(lambda: HttpConnection(self), host, port,
                                                     reuse_address=True, reuse_port=share_port, backlog=2048)

    async def close(self) -> None:
        """Stop listening and close every connection (call after the drain)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1)
