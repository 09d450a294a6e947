"""The proxy's request handler: routing, auth, limits, then one exchange with a vLLM backend."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from serving.auth import KeyCheck, RateLimiter
from serving.config import ProxyConfig, Route, build_routes, load_api_keys
from serving.errors import ApiError, error_body
from serving.exchange import Exchange
from serving.httpserver import Request, Response
from serving.metrics import Metrics, status_class
from serving.shaping import shape
from serving.upstream import Pool, check_all, health_loop

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ROUTE_LABELS = {CHAT: "chat", COMPLETIONS: "completions", "/v1/models": "models"}
JSON = b"application/json"
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"


def send_json(response: Response, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    response.send(status, [(b"content-type", JSON), *extra], body)


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
        self.draining = False
        self.active = 0
        self._health_task: asyncio.Task[None] | None = None
        self._models_body = self._models_listing()

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def _unique_pools(self) -> list[Pool]:
        return list({id(p): p for p in self.pools.values()}.values())

    async def startup(self) -> None:
        for pool in self._unique_pools:
            for backend in pool.backends:
                backend.open()
        await check_all(self._unique_pools)
        self._health_task = asyncio.create_task(health_loop(self._unique_pools, self.config.health_interval_seconds))

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        for pool in self._unique_pools:
            for backend in pool.backends:
                backend.connections.close()

    @property
    def ready(self) -> bool:
        return not self.draining and all(pool.any_healthy for pool in self.pools.values())

    # ---- requests ----------------------------------------------------------------------------
    async def handle(self, request: Request, response: Response) -> None:
        path = request.path
        if path.startswith("/v1/"):
            self.active += 1
            try:
                await self._api(request, response, path)
            finally:
                self.active -= 1
        elif path == "/health":
            send_json(response, 200, b'{"status":"ok"}')
        elif path == "/ready":
            ok = self.ready
            detail = {name: pool.any_healthy for name, pool in self.pools.items()}
            body = json.dumps({"ready": ok, "draining": self.draining, "models": detail}).encode()
            send_json(response, 200 if ok else 503, body)
        elif path == "/metrics":
            response.send(200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], self.metrics.exposition())
        else:
            send_json(response, 404, error_body(404, f"no such path: {path}"))

    async def _api(self, request: Request, response: Response, path: str) -> None:
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
                caller = self.keys.identify(request.header(b"authorization"))
                self.limiter.check(caller)
            except ApiError as exc:
                self.metrics.rejected.labels("auth" if exc.status == 401 else "rate_limit").inc()
                raise
            if path == "/v1/models" and request.method == "GET":
                send_json(response, 200, self._models_body)
                status = 200
                return
            if request.method != "POST":
                raise ApiError(404, f"no such endpoint: {request.method} {path}")
            raw = self._body(request)
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
            status = await exchange.run(response)
        except ApiError as exc:
            status = exc.status
            if response.started:
                raise  # cannot happen: errors after the start are SSE events
            send_json(response, exc.status, exc.body(), exc.headers)
        except asyncio.CancelledError:
            # The client went away; the exchange closed its backend request, so vLLM aborts it.
            status = CLIENT_CLOSED
            raise
        finally:
            self.metrics.requests.labels(model_label, route_label, status_class(status)).inc()
            self.metrics.duration.labels(model_label, route_label).observe(time.perf_counter() - start)

    def _body(self, request: Request) -> bytes:
        if request.body_too_large:
            limit = self.config.limits.max_body_bytes
            self.metrics.rejected.labels("body_too_large").inc()
            if request.declared_length is not None and request.declared_length > limit:
                raise ApiError(413, f"request body of {request.declared_length} bytes exceeds the limit of "
                                    f"{limit} bytes")
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        return request.body

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
