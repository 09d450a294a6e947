"""Run the proxy (uvloop + serving.httpserver), with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT, /ready answers 503 and new requests are refused with 503 while
requests in flight (streams included) finish, up to `drain_seconds`; then the server exits.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import signal
import time

import uvloop

from serving.app import ProxyApp
from serving.httpserver import HttpServer

DRAIN_POLL_SECONDS = 0.05


async def serve(app: ProxyApp) -> None:
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
    await app.startup()
    server = HttpServer(app.handle, app.config.limits.max_body_bytes)
    await server.listen(listen.host, listen.port)
    print(f"qwen proxy listening on http://{listen.host}:{listen.port} "
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


def run(app: ProxyApp) -> None:
    uvloop.run(serve(app))
