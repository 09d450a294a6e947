"""Run the proxy on uvicorn (httptools parser, uvloop), with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT, /ready answers 503, idle keep-alive connections are closed, busy
ones close after their answer, and new requests get a 503 with `connection: close` while
requests in flight (streams included) finish, up to `drain_seconds`; then uvicorn shuts down.
The listener stays open while draining, so a client still routed here gets a clear 503 rather
than a refused connection. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn
import uvloop

from serving.app import ProxyApp
from serving.http_protocol import ProxyHttpProtocol
from serving.resources import raise_open_files_limit

log = logging.getLogger("serving")
# Once the drain ends, what is still open gets this long before uvicorn cancels it.
FINAL_GRACE_SECONDS = 2


class ListenError(Exception):
    """The listen address cannot be bound."""


class ProxyServer(uvicorn.Server):
    """uvicorn's server with the proxy's drain in place of its immediate shutdown."""

    def __init__(self, config: uvicorn.Config, app: ProxyApp) -> None:
        super().__init__(config)
        self.app = app
        self.drain_deadline = 0.0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a captured signal after shutdown (the process then dies of it); a
        # drained proxy exits 0 instead, which is what a supervisor should see.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.app.draining:
            self.force_exit = self.should_exit = True  # second signal: at once
            return
        self.app.draining = True
        self.drain_deadline = time.monotonic() + self.app.config.drain_seconds
        for connection in list(self.server_state.connections):
            connection.shutdown()  # uvicorn's: close if idle, else no keep-alive after this answer

    async def on_tick(self, counter: int) -> bool:
        if self.app.draining and not self.should_exit and (
                self.app.active == 0 or time.monotonic() >= self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def bind(host: str, port: int, share_port: bool) -> socket.socket:
    """The listening socket; with SO_REUSEPORT when several worker processes share the port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                          "(another process on that port? set listen.port or --port)") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: ProxyApp) -> uvicorn.Config:
    return uvicorn.Config(
        app, http=ProxyHttpProtocol, loop="none", lifespan="off", ws="none", interface="asgi3",
        log_config=None, access_log=False, server_header=False, proxy_headers=False,
        timeout_keep_alive=app.config.limits.client_idle_seconds,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=FINAL_GRACE_SECONDS,
    )


async def serve(app: ProxyApp, share_port: bool) -> None:
    listen = app.config.listen
    sock = bind(listen.host, listen.port, share_port)  # before startup: a taken port fails fast
    server = ProxyServer(uvicorn_config(app), app)
    await app.startup()
    # The startup heap (config, profiles, metrics, imported modules) is never garbage: out of the
    # collector's full passes while serving, as vLLM's API server does with its own (freeze_gc_heap).
    gc.collect()
    gc.freeze()
    who = f"worker {os.getpid()} " if share_port else ""
    print(f"qwen proxy {who}listening on http://{listen.host}:{listen.port} "
          f"(models: {', '.join(sorted(app.routes))})", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        await app.shutdown()


def run(app: ProxyApp, share_port: bool = False) -> int:
    """Serve until stopped; 0, or 2 when the address cannot be listened on."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    log.info(raise_open_files_limit())
    try:
        uvloop.run(serve(app, share_port))
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
