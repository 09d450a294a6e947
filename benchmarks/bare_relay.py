"""The floor for any proxy on the proxy's own libraries: a bare streaming relay, nothing else.

A raw ASGI callable on uvicorn (httptools, uvloop) that forwards each request's body to one
upstream with one aiohttp ClientSession and streams the answer back read by read. No routing,
shaping, auth, metrics or error handling: what the proxy costs beyond this is its own work.

    python -m benchmarks.bare_relay --upstream http://127.0.0.1:8100 --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

Scope = dict[str, Any]


class BareRelay:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                                                 auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        async with self.session.post(self.upstream + scope["path"], data=body,
                                     headers={"content-type": "application/json"}) as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", response.headers.get("content-type", "").encode())]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_relay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="base URL to relay to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(BareRelay(args.upstream), host=args.host, port=args.port, http="httptools", loop="uvloop",
                lifespan="off", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
