"""ASGI plumbing: the request as the proxy reads it, its body within a limit, whole answers.

uvicorn owns the protocol (parsing, framing, keep-alive, flow control); this module only turns
its ASGI scope and messages into what the handlers need, and back.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from serving.errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
CLOSE = (b"connection", b"close")
UNSAFE_IN_PATH = re.compile("[\x00-\x20\x7f]")  # control characters and space


# scope["extensions"] key of a request's Hangup (serving/http_protocol.py puts one in every scope).
HANGUP = "qwen.hangup"


class ClientGone(Exception):
    """The client closed its connection before the proxy answered."""


class Hangup:
    """What happens if the client's connection is lost before its answer is complete.

    The application sets `callback` while it works on the request (to cancel that work: the backend
    request then closes, so vLLM aborts it); the protocol calls it from `connection_lost`. No task
    per request waits on `receive()` for the disconnect. The other way round, `abort()` ends the
    connection from the application's side (the last resort, once an answer cannot be finished):
    the protocol sets `cycle` (uvicorn's request-response cycle) once the request's head is read."""

    __slots__ = ("callback", "cycle", "fired")

    def __init__(self) -> None:
        self.callback: Callable[[], object] | None = None
        self.fired = False
        self.cycle: Any = None

    def fire(self) -> None:
        self.fired = True
        if self.callback is not None:
            self.callback()

    def abort(self) -> None:
        """Close the connection: what was sent is flushed, nothing more is (an unfinished body stays
        unfinished, which the client reads as incomplete)."""
        cycle = self.cycle
        if cycle is not None:
            cycle.disconnected = True  # uvicorn sends nothing more, and does not log a short answer
            cycle.transport.close()


class Incoming:
    """One request's line and headers, from the ASGI scope (names are lower case there)."""

    __slots__ = ("client", "hangup", "headers", "http10", "method", "path", "query", "raw_path")

    def __init__(self, scope: Scope) -> None:
        self.client: tuple[str, int] | None = scope.get("client")  # the TCP peer (optional in ASGI)
        self.http10 = scope["http_version"] == "1.0"  # no chunked coding: no streamed answers
        self.method: str = scope["method"]
        self.path: str = scope["path"]  # percent-decoded: for matching only
        self.raw_path: bytes = scope["raw_path"]  # as received: what is forwarded
        self.query: bytes = scope["query_string"]
        self.headers: Headers = scope["headers"]
        self.hangup: Hangup = scope["extensions"][HANGUP]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def target(self) -> str:
        """The raw path and query string, as the client sent them (still percent-encoded)."""
        raw = self.raw_path + (b"?" + self.query if self.query else b"")
        return raw.decode("latin-1")

    def has_unsafe_path(self) -> bool:
        """Control characters or spaces once decoded: refused rather than matched or logged."""
        return UNSAFE_IN_PATH.search(self.path) is not None


def declared_length(incoming: Incoming) -> int | None:
    value = incoming.header(b"content-length")
    # uvicorn's parser (llhttp) has already refused a malformed or duplicated Content-Length.
    return int(value) if value is not None and value.isdigit() else None


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it grows past `limit` (nothing more is read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def body_too_large(limit: int, declared: int | None = None) -> ApiError:
    # The rest of the body is never read: the connection must close after the answer.
    size = f"request body of {declared} bytes" if declared is not None else "request body"
    return ApiError(413, f"{size} exceeds the limit of {limit} bytes (limits.max_body_bytes)",
                    headers={"connection": "close"})


async def send_whole(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None,
                    close: bool = False) -> None:
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if close and CLOSE not in extra:
        extra.append(CLOSE)
    await send_whole(send, status, body, [(b"content-type", JSON), *extra])
