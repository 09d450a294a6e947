"""HTTP/1.1 client for the vLLM backends: pooled keep-alive connections, httptools parsing.

Why not aiohttp: a streamed body goes through a StreamReader, a future and a task switch per
read before the proxy sees it. Here the body is handed to a callback inside `data_received`, so
the relay forwards each token to the client in the same turn of the event loop it arrived in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

# vLLM's server closes idle keep-alive connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
# dropping ours first avoids sending a request down a connection it is closing.
KEEPALIVE_SECONDS = 4.0

Sink = Callable[[bytes], None]
EndCallback = Callable[[Exception | None], None]


class ConnectFailed(Exception):
    """Nothing accepted a connection at the backend's address (refused, unreachable, timed out)."""


class ConnectionReset(Exception):
    """The connection ended before the response did."""


class BackendConnection(asyncio.Protocol):
    """One keep-alive connection; one request at a time.

    The connection goes back to the pool only when both the response has ended and its user
    called `finish()`: a user still reading the headers or the buffered body must not find the
    connection handed to another request meanwhile.
    """

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport
        self.closed = False
        self.parser: httptools.HttpResponseParser | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.body_seen = False
        self.last_data = 0.0
        self.requests = 0  # requests sent on this connection: tells one exchange from the next
        self._finished = False
        self._reusable = False
        self._chunks: list[bytes] = []
        self._sink: Sink | None = None
        self._on_end: EndCallback | None = None
        self._head: asyncio.Future[int] | None = None
        self._done: asyncio.Future[None] | None = None

    # ---- use ------------------------------------------------------------------------------------
    def send(self, method: str, path: str, body: bytes | None) -> None:
        self.requests += 1
        self.parser = httptools.HttpResponseParser(self)
        self.headers, self._chunks = [], []
        self.complete = self.body_seen = self._finished = self._reusable = False
        self._sink = self._on_end = None
        self._head = self.loop.create_future()
        self._done = None
        self.last_data = self.loop.time()
        target = (self.pool.prefix + path).encode()
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), target, self.pool.host_header)
        if body is None:
            self.transport.write(head + b"\r\n")
        else:
            self.transport.write(head + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                                 % (len(body), body))

    async def response_head(self) -> int:
        """The status code, once the response's headers are in."""
        assert self._head is not None
        return await self._head

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read_body(self) -> bytes:
        if not self.complete:
            if self.closed:
                raise ConnectionReset("the backend closed the connection mid-response")
            self._done = self.loop.create_future()
            await self._done
        return b"".join(self._chunks)

    def stream(self, sink: Sink, on_end: EndCallback) -> None:
        """Hand the body to `sink` as it arrives (what already arrived first); `on_end` once, at
        the end of the body (None) or when the connection fails (the error)."""
        buffered, self._chunks = self._chunks, []
        for chunk in buffered:
            sink(chunk)
        if self.complete:
            on_end(None)
        elif self.closed:
            on_end(ConnectionReset("the backend closed the connection mid-response"))
        else:
            self._sink, self._on_end = sink, on_end

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def finish(self) -> None:
        """Done with this response: the connection is reused once its body has ended."""
        self._finished = True
        if self.complete:
            self._recycle()

    def _recycle(self) -> None:
        if self._reusable and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        """Give up on this connection (the backend sees the request end and aborts it)."""
        if not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)

    # ---- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        if self.parser is None:
            self.close()  # bytes nobody asked for
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionReset(f"the backend sent a malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.complete:
            self._fail(ConnectionReset("the backend closed the connection" + (f": {exc}" if exc else "")))

    # ---- httptools callbacks ---------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        if self._head is not None and not self._head.done():
            self._head.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.body_seen = True
        if self._sink is not None:
            self._sink(body)
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self.complete = True
        self._reusable = self.parser.should_keep_alive()
        self.parser = None
        on_end, self._sink, self._on_end = self._on_end, None, None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if on_end is not None:
            on_end(None)
        if self._finished:
            self._recycle()

    def _fail(self, error: ConnectionReset) -> None:
        for waiter in (self._head, self._done):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        on_end, self._sink, self._on_end = self._on_end, None, None
        if on_end is not None:
            on_end(error)


class BackendPool:
    """Keep-alive connections to one backend base URL (a path prefix in the URL is kept)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.ssl else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc.encode()
        self.loop = asyncio.get_running_loop()
        self._idle: list[tuple[BackendConnection, float]] = []

    async def connect(self, timeout: float) -> tuple[BackendConnection, bool]:
        """A connection and whether it was reused (a reused one may have been closed meanwhile)."""
        now = self.loop.time()
        while self._idle:
            conn, since = self._idle.pop()
            if conn.closed:
                continue
            if now - since > KEEPALIVE_SECONDS:
                conn.close()
                continue
            return conn, True
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(lambda: BackendConnection(self), self.host, self.port,
                                                            ssl=True if self.ssl else None)
        except TimeoutError:
            raise ConnectFailed(f"no connection to {self.url} within {timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.url}: {exc.strerror or exc}") from None
        return conn, False

    def release(self, conn: BackendConnection) -> None:
        self._idle.append((conn, self.loop.time()))

    def forget(self, conn: BackendConnection) -> None:
        self._idle = [(c, t) for c, t in self._idle if c is not conn]

    def close(self) -> None:
        for conn, _ in self._idle:
            conn.close()
        self._idle = []

    async def get(self, path: str, timeout: float) -> tuple[int, bytes]:
        """A small GET (health checks)."""
        async with asyncio.timeout(timeout):
            conn, _ = await self.connect(timeout)
            try:
                conn.send("GET", path, None)
                status = await conn.response_head()
                return status, await conn.read_body()
            finally:
                if conn.complete:
                    conn.finish()
                else:
                    conn.close()
