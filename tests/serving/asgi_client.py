"""Requests through the proxy's ASGI application in this process, as uvicorn passes them (no server,
no sockets on the client side): for tests that need the application's own clock or state."""

from __future__ import annotations

import json
from typing import Any

from serving.app import ProxyApp
from serving.http_io import HANGUP, Hangup


async def call(app: ProxyApp, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """One request through the ASGI application, as uvicorn would pass it."""
    raw = json.dumps(body).encode() if body is not None else b""
    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(raw)).encode())],
             "extensions": {HANGUP: Hangup()}}
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: Any) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:])
