"""Run the proxy on uvicorn (httptools parser, uvloop), with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT the proxy drains: /ready answers 503 (the endpoint is being removed),
but the listener stays open and every request that still arrives is served, as a client routed
here has not yet seen the removal; every answer carries `connection: close`, so clients move to
other replicas; a connection with nothing to answer is closed once idle DRAIN_IDLE_SECONDS
(serving/http_protocol.py), not at the signal, which would race a client sending on it. The
process exits as soon as nothing is in flight and no client connection is open, or at
`drain_seconds`, when what is left is cut. A second signal exits at once.
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
from serving.http_protocol import DRAIN_IDLE_SECONDS, DrainState, ProxyHttpProtocol
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
        self.server_state: DrainState = DrainState()  # every connection's protocol reads `draining` from it
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
        # A signal handler: flags only (the connections are told on the next tick, where it is safe
        # to touch the loop and to log).
        if self.app.draining:
            self.force_exit = self.should_exit = True  # second signal: at once
            return
        self.app.draining = True  # from now: /ready 503, every answer `connection: close`
        self.drain_deadline = time.monotonic() + self.app.config.drain_seconds

    async def on_tick(self, counter: int) -> bool:
        state = self.server_state
        if self.app.draining and not self.should_exit:
            if not state.draining:
                state.draining = True
                for connection in list(state.connections):
                    connection.drain()  # type: ignore[union-attr]  # every connection is a ProxyHttpProtocol
                log.info("draining (signal received): %d requests in flight, %d client connections open; "
                         "serving what still arrives with `connection: close`, idle connections closed after "
                         "%g s; exit when all are done, or in %g s (drain_seconds)", self.app.active,
                         len(state.connections), DRAIN_IDLE_SECONDS, self.app.config.drain_seconds)
            if self.app.active == 0 and not state.connections:
                log.info("drained: nothing in flight, no client connection open; exiting")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                log.warning("drain_seconds (%g s) reached: %d requests still in flight are cut",
                            self.app.config.drain_seconds, self.app.active)
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
