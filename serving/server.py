"""Run the proxy under uvicorn (uvloop + httptools), with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT, /ready answers 503 and new requests are refused with 503 while
requests in flight (streams included) finish, up to `drain_seconds`; then the server exits.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import time
from types import FrameType

import uvicorn

from serving.app import ProxyApp

DRAIN_POLL_SECONDS = 0.1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: ProxyApp, drain_seconds: float) -> None:
        super().__init__(config)
        self.proxy = app
        self.drain_seconds = drain_seconds
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.proxy.draining:
            super().handle_exit(sig, frame)  # second signal: uvicorn's own (forced) exit
            return
        self.proxy.draining = True
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_seconds
        while self.proxy.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        self.should_exit = True


def run(app: ProxyApp) -> None:
    listen = app.config.listen
    config = uvicorn.Config(
        app, host=listen.host, port=listen.port, loop="uvloop", http="httptools", lifespan="on",
        log_level="warning", access_log=False, timeout_keep_alive=75, proxy_headers=False,
        timeout_graceful_shutdown=int(app.config.drain_seconds) + 1,
    )
    server = DrainingServer(config, app, app.config.drain_seconds)
    print(f"qwen proxy listening on http://{listen.host}:{listen.port} "
          f"(models: {', '.join(sorted(app.routes))})", flush=True)
    server.run()
