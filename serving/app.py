"""The proxy as a raw ASGI app: routing, auth, limits, then one exchange with a vLLM backend."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from serving.auth import KeyCheck, RateLimiter
from serving.config import ProxyConfig, Route, build_routes, load_api_keys
from serving.errors import ApiError, error_body
from serving.exchange import Exchange
from serving.metrics import Metrics, status_class
from serving.shaping import shape
from serving.upstream import Pool, check_all, health_loop

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ROUTE_LABELS = {CHAT: "chat", COMPLETIONS: "completions", "/v1/models": "models"}
JSON_HEADERS = [(b"content-type", b"application/json")]
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"
UPSTREAM_KEEPALIVE_SECONDS = 4.0


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def send_json(send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class ProxyApp:
    def __init__(self, config: ProxyConfig, environ: Mapping[str, str] = os.environ,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.routes: dict[str, Route] = build_routes(config)
        self.metrics = Metrics(registry or CollectorRegistry())
        pools_by_entry: dict[int, Pool] = {}
        self.pools: dict[str, Pool] = {}
        for name, route in self.routes.items():
            key = id(route.entry)
            if key not in pools_by_entry:
                pools_by_entry[key] = Pool(route.served_name, route.entry.backends, self.metrics)
            self.pools[name] = pools_by_entry[key]
        self.keys = KeyCheck(load_api_keys(config.auth, environ))
        self.limiter = RateLimiter(config.limits.requests_per_minute_per_key)
        self.session: aiohttp.ClientSession | None = None
        self.draining = False
        self.active = 0
        self._health_task: asyncio.Task[None] | None = None
        self._models_body = self._models_listing()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def startup(self) -> None:
        # vLLM's server closes idle keep-alive connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
        # dropping ours first avoids sending a request down a connection it is closing.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        unique = list({id(p): p for p in self.pools.values()}.values())
        await check_all(self.session, unique)
        self._health_task = asyncio.create_task(
            health_loop(self.session, unique, self.config.health_interval_seconds))

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.session is not None:
            await self.session.close()

    @property
    def ready(self) -> bool:
        return not self.draining and all(pool.any_healthy for pool in self.pools.values())

    # ---- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path.startswith("/v1/"):
            self.active += 1
            try:
                await self._api(scope, receive, send, path)
            finally:
                self.active -= 1
        elif path == "/health":
            await send_json(send, 200, b'{"status":"ok"}')
        elif path == "/ready":
            ok = self.ready
            detail = {name: pool.any_healthy for name, pool in self.pools.items()}
            body = json.dumps({"ready": ok, "draining": self.draining, "models": detail}).encode()
            await send_json(send, 200 if ok else 503, body)
        elif path == "/metrics":
            payload = generate_latest(self.metrics.registry)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})
            await send({"type": "http.response.body", "body": payload})
        else:
            await send_json(send, 404, error_body(404, f"no such path: {path}"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---- /v1 ---------------------------------------------------------------------------------
    async def _api(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        start = time.perf_counter()
        route_label = ROUTE_LABELS.get(path, "other")
        model_label = "unknown"
        status = 500
        try:
            if self.draining:
                self.metrics.rejected.labels("draining").inc()
                raise ApiError(503, "the proxy is shutting down: retry on another replica",
                               headers={"retry-after": "1"})
            try:
                caller = self.keys.identify(_header(scope, b"authorization"))
                self.limiter.check(caller)
            except ApiError as exc:
                self.metrics.rejected.labels("auth" if exc.status == 401 else "rate_limit").inc()
                raise
            if path == "/v1/models" and scope["method"] == "GET":
                await send_json(send, 200, self._models_body)
                status = 200
                return
            if scope["method"] != "POST":
                raise ApiError(404, f"no such endpoint: {scope['method']} {path}")
            raw = await self._read_body(scope, receive)
            data = self._parse(raw)
            route = self._route_for(data, known_path=path in (CHAT, COMPLETIONS))
            model_label = route.served_name
            if route.name != route.served_name:
                data["model"] = route.served_name  # vLLM knows the served name only
                raw = json.dumps(data).encode()
            if path in (CHAT, COMPLETIONS):
                try:
                    shaped = shape(data, route.sampling, chat=path == CHAT)
                except ApiError as exc:
                    if exc.code == "greedy_decoding_refused":
                        self.metrics.greedy.labels(model_label, "rejected").inc()
                    self.metrics.rejected.labels("invalid").inc()
                    raise
                for name in shaped.applied:
                    self.metrics.defaults_applied.labels(model_label, name).inc()
                if shaped.greedy_action:
                    self.metrics.greedy.labels(model_label, shaped.greedy_action).inc()
            else:
                shaped = None
            exchange = Exchange(self, route, self.pools[route.name], path, shaped, raw, start)
            status = await self._watch_client(exchange.run(send), receive)
        except ApiError as exc:
            status = exc.status
            await send_json(send, exc.status, exc.body(), exc.headers)
        finally:
            self.metrics.requests.labels(model_label, route_label, status_class(status)).inc()
            self.metrics.duration.labels(model_label, route_label).observe(time.perf_counter() - start)

    async def _watch_client(self, work: Awaitable[int], receive: Receive) -> int:
        """Run the exchange; if the client goes away first, cancel it so the backend aborts too."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._disconnected(receive))
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            watcher.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return CLIENT_CLOSED

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.metrics.rejected.labels("body_too_large").inc()
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self.metrics.rejected.labels("body_too_large").inc()
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
        return data

    def _route_for(self, data: dict[str, Any], known_path: bool) -> Route:
        model = data.get("model")
        known = ", ".join(sorted(self.routes))
        if model is None:
            self.metrics.rejected.labels("invalid").inc()
            if not known_path:
                raise ApiError(404, f"no such endpoint for a request without 'model'; known models: {known}")
            raise ApiError(400, f"'model' is required; known models: {known}", param="model")
        if not isinstance(model, str):
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(400, f"'model' must be a string; known models: {known}", param="model")
        route = self.routes.get(model)
        if route is None:
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(404, f"model {model!r} does not exist; known models: {known}",
                           param="model", code="model_not_found")
        return route

    def _models_listing(self) -> bytes:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "qwen-serve",
                 "root": route.profile.model, "max_model_len": route.profile.max_model_len}
                for name, route in sorted(self.routes.items())]
        return json.dumps({"object": "list", "data": data}).encode()


def create_app(config: ProxyConfig, environ: Mapping[str, str] = os.environ,
               registry: CollectorRegistry | None = None) -> ProxyApp:
    return ProxyApp(config, environ, registry)
