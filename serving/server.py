"""Run the proxy (uvloop + serving.httpserver), with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT, /ready answers 503 and new requests are refused with 503 while
requests in flight (streams included) finish, up to `drain_seconds`; then the server exits.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import uvloop

from serving.app import ProxyApp
from serving.httpserver import HttpServer

DRAIN_POLL_SECONDS = 0.05


class ListenError(Exception):
    """The listen address cannot be bound."""


async def serve(app: ProxyApp, share_port: bool) -> None:
    listen = app.config.listen
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    forced = asyncio.Event()

    def on_signal() -> None:
        if app.draining:
            forced.set()  # second signal: exit at once
            stop.set()
            return
        app.draining = True
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    limits = app.config.limits
    server = HttpServer(app.handle, limits.max_body_bytes, limits.client_idle_seconds)
    try:
        await server.listen(listen.host, listen.port, share_port)  # before startup: a taken port fails fast
    except OSError as exc:
        raise ListenError(f"cannot listen on {listen.host}:{listen.port}: {exc.strerror or exc} "
                          "(another process on that port? set listen.port or --port)") from None
    await app.startup()
    who = f"worker {os.getpid()} " if share_port else ""
    print(f"qwen proxy {who}listening on http://{listen.host}:{listen.port} "
          f"(models: {', '.join(sorted(app.routes))})", flush=True)
    try:
        await stop.wait()
        deadline = time.monotonic() + app.config.drain_seconds
        # Draining: the listener stays open so new requests get a clear 503, not a refused connection.
        while app.active > 0 and time.monotonic() < deadline and not forced.is_set():
            await asyncio.sleep(DRAIN_POLL_SECONDS)
    finally:
        await server.close()
        await app.shutdown()


def run(app: ProxyApp, share_port: bool = False) -> int:
    """Serve until stopped; 0, or 2 when the address cannot be listened on."""
    try:
        uvloop.run(serve(app, share_port))
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
