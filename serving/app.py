"""The proxy as an ASGI application: endpoints, auth, limits, then one exchange with a backend."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from serving.affinity import request_key
from serving.auth import ClientAddress, KeyCheck, RateLimiter
from serving.config import ProxyConfig, Route, build_routes, load_api_keys
from serving.discovery import Resolver, discovery_loop, refresh, resolve
from serving.errors import ApiError, error_body
from serving.exchange import Exchange
from serving.http_io import (
    CLOSE,
    ClientGone,
    Hangup,
    Headers,
    Incoming,
    Receive,
    Scope,
    Send,
    body_too_large,
    declared_length,
    read_body,
    send_json,
    send_whole,
)
from serving.last_resort import InternalErrors
from serving.metrics import Metrics
from serving.openai_shaping import shape
from serving.openapi import spec_json
from serving.resources import ThrottledLog
from serving.routing import ModelBackends, health_loop
from serving.upstream import Upstream

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
SHAPED = {CHAT: "chat", COMPLETIONS: "completions"}
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"
READ_METHODS = ("GET", "HEAD")
OPENAPI = "/openapi.json"
OPERATIONAL = frozenset({"/health", "/ready", "/metrics", OPENAPI})  # no auth: probes and scrapers
# The `route` label of an internal error outside /v1/ (bounded: never the client's path).
OPERATIONAL_ROUTES = {"/health": "health", "/ready": "ready", "/metrics": "metrics", OPENAPI: "openapi"}
TOO_DEEP = "request body nests deeper than the proxy reads (JSON arrays and objects within each other)"


class ProxyApp:
    """`resolver` and `ssl_context` replace the system's DNS and CA certificates (tests)."""

    def __init__(self, config: ProxyConfig, environ: Mapping[str, str] = os.environ,
                 registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic,
                 resolver: Resolver = resolve, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.routes: dict[str, Route] = build_routes(config)
        self._known_models = ", ".join(sorted(self.routes))
        self.metrics = Metrics(registry or CollectorRegistry())
        by_entry: dict[int, ModelBackends] = {}
        self.backends: dict[str, ModelBackends] = {}
        for name, route in self.routes.items():
            key = id(route.entry)
            if key not in by_entry:
                by_entry[key] = ModelBackends(route.served_name, route.entry, self.metrics, clock)
            self.backends[name] = by_entry[key]
        self.models = list(by_entry.values())
        self.forward_paths = frozenset(config.forward_paths)
        self.keys = KeyCheck(load_api_keys(config.auth, environ))
        self.limiter = RateLimiter(config.limits.requests_per_minute_per_key)
        self.clients = ClientAddress(config.limits.trusted_proxies)
        self.internal_errors = InternalErrors(self.metrics.internal_errors)
        self.exhausted_log = ThrottledLog()
        self.resolver = resolver
        self.ssl_context = ssl_context
        self.draining = False
        self.started = False
        self.active = 0
        self.upstream: Upstream | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._models_body = self._models_listing()
        self._openapi = spec_json(config.forward_paths)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def startup(self) -> None:
        self.upstream = upstream = Upstream(self.config.health_interval_seconds, self.ssl_context)
        # Resolve (where discovery is on), then check.
        await asyncio.gather(*(refresh(upstream, model, self.resolver) for model in self.models))
        skipped = ThrottledLog()
        self._tasks = [
            asyncio.create_task(health_loop(upstream, self.models, self.config.health_interval_seconds, skipped)),
            asyncio.create_task(discovery_loop(upstream, self.models, self.config.dns_refresh_seconds, self.resolver)),
        ]
        self.started = True

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.upstream is not None:
            await self.upstream.close()

    @property
    def ready(self) -> bool:
        """This proxy can serve: started and not draining. Whether each model's backends can is in
        /ready's body and in metrics, and a model without one answers its own 503: a readiness
        that followed the models would take every proxy out of its Service for one model's outage."""
        return self.started and not self.draining

    def readiness(self) -> bytes:
        models = {model.model: model.health() for model in self.models}
        return json.dumps({"ready": self.ready, "draining": self.draining, "models": models}).encode()

    # ---- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are refused by the protocol
        incoming = Incoming(scope)
        if incoming.path.startswith("/v1/") and not incoming.has_unsafe_path():
            self.active += 1
            try:
                await self._api(incoming, receive, send)
            finally:
                self.active -= 1
            return
        try:
            await self._operational(incoming, send)
        except Exception as exc:  # noqa: BLE001 - the last resort: a JSON 500 rather than uvicorn's text one
            await self.internal_errors.answer(OPERATIONAL_ROUTES.get(incoming.path, "other"), exc, send,
                                              incoming.hangup, started=False, stream=False)

    async def _operational(self, incoming: Incoming, send: Send) -> None:
        path = incoming.path
        if incoming.has_unsafe_path():
            await send_json(send, 400, error_body(400, "the request path has control characters or spaces once "
                                                       "percent-decoded"), close=True)
        elif path not in OPERATIONAL:
            await send_json(send, 404, error_body(404, f"no such path: {path}"), close=self.draining)
        elif incoming.method not in READ_METHODS:
            await send_json(send, 405, error_body(405, f"{path} takes GET, not {incoming.method}"),
                            {"allow": "GET, HEAD"}, close=self.draining)
        elif path == "/health":
            await send_json(send, 200, b'{"status":"ok"}', close=self.draining)
        elif path == OPENAPI:
            await send_json(send, 200, self._openapi, close=self.draining)
        elif path == "/ready":
            await send_json(send, 200 if self.ready else 503, self.readiness(), close=self.draining)
        else:
            headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), *self._closing()]
            await send_whole(send, 200, self.metrics.exposition(), headers)

    def _closing(self) -> Headers:
        # While draining, every answer ends its connection (clients reconnect to another replica).
        return [CLOSE] if self.draining else []

    async def _api(self, incoming: Incoming, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        path = incoming.path
        route_label = "models" if path == MODELS else SHAPED.get(path, "other")
        model_label = "unknown"
        status = 500
        exchange: Exchange | None = None
        try:
            # Draining, requests are still served (clients routed here have not yet seen the endpoint
            # removal); their answers carry `connection: close`.
            if self.keys.enabled or self.limiter.per_minute is not None:
                self._admit(incoming)
            if path == MODELS:
                if incoming.method not in READ_METHODS:
                    raise ApiError(405, f"{path} takes GET, not {incoming.method}", headers={"allow": "GET, HEAD"})
                await send_json(send, 200, self._models_body, close=self.draining)
                status = 200
                return
            if path not in SHAPED and path not in self.forward_paths:
                raise ApiError(404, f"no such endpoint: {incoming.method} {path}")
            if incoming.method != "POST":
                raise ApiError(405, f"{path} takes POST, not {incoming.method}", headers={"allow": "POST"})
            raw = await self._body(incoming, receive)
            data = self._parse(raw)
            route = self._route_for(data)
            model_label = route.served_name
            aliased = route.name != route.served_name
            if aliased:
                data["model"] = route.served_name  # vLLM knows the served name only
            shaped = None
            target = path  # the shaped routes forward their own path, never the client's spelling
            if path in SHAPED:
                try:
                    shaped = shape(data, route.sampling, chat=path == CHAT, engine=route.profile.engine)
                except ApiError as exc:
                    if exc.code == "greedy_decoding_refused":
                        self.metrics.greedy.labels(model_label, "rejected").inc()
                    self.metrics.rejected.labels("invalid").inc()
                    raise
                for name in shaped.applied:
                    self.metrics.defaults_applied.labels(model_label, name).inc()
                if shaped.greedy_action:
                    self.metrics.greedy.labels(model_label, shaped.greedy_action).inc()
                raw = self._encode(shaped.body)
            else:
                target = incoming.target  # forwarded as received: still percent-encoded
                if aliased:
                    raw = self._encode(data)
            if incoming.http10 and (shaped.stream if shaped is not None else data.get("stream") is True):
                raise ApiError(505, "a streamed answer needs HTTP/1.1 (chunked transfer coding); send the "
                               "request over HTTP/1.1, or without 'stream'")
            assert self.upstream is not None
            backends = self.backends[route.name]
            key = request_key(data, path == CHAT, incoming.header(backends.session_header)) \
                if backends.affinity and path in SHAPED else None
            exchange = Exchange(self.metrics, self.upstream, route, backends, target, shaped, raw, start, key,
                                self.config.retries.max_attempts, self.exhausted_log, self._closing())
            status = await self._until_client_leaves(exchange, incoming.hangup, send)
        except ApiError as exc:
            status = exc.status
            await send_json(send, exc.status, exc.body(), exc.headers, close=self.draining)
        except ClientGone:
            status = CLIENT_CLOSED
        except Exception as exc:  # noqa: BLE001 - the last resort: never uvicorn's text 500 and traceback per request
            status = 500
            started = exchange is not None and exchange.started
            await self.internal_errors.answer(route_label, exc, send, incoming.hangup, started,
                                              stream=exchange is not None and exchange.sse)
        finally:
            self.metrics.answered(model_label, route_label, status, time.perf_counter() - start)

    def _admit(self, incoming: Incoming) -> None:
        """The API key (401), then the rate limit (429) of the request's identity: its key, or else
        the client's address."""
        try:
            caller = self.keys.identify(incoming.header(b"authorization"))
            if self.limiter.per_minute is not None:
                if caller is None:
                    peer = incoming.client[0] if incoming.client else None
                    caller = self.clients.of(peer, incoming.headers)
                self.limiter.check(caller)
        except ApiError as exc:
            self.metrics.rejected.labels("auth" if exc.status == 401 else "rate_limit").inc()
            raise

    def _encode(self, data: dict[str, Any]) -> bytes:
        try:
            return json.dumps(data).encode()
        except RecursionError:
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(400, TOO_DEEP) from None

    async def _until_client_leaves(self, exchange: Exchange, hangup: Hangup, send: Send) -> int:
        """Run the exchange; if the client disconnects first, cancel it (which closes the backend
        request, so vLLM aborts it) and answer nothing."""
        task = asyncio.current_task()
        assert task is not None
        if hangup.fired:
            return CLIENT_CLOSED  # gone since its body was read
        hangup.callback = task.cancel
        try:
            return await exchange.run(send)
        except asyncio.CancelledError:
            if hangup.fired and task.uncancel() == 0:
                return CLIENT_CLOSED  # our own cancel: the client left
            raise
        finally:
            hangup.callback = None

    async def _body(self, incoming: Incoming, receive: Receive) -> bytes:
        limit = self.config.limits.max_body_bytes
        declared = declared_length(incoming)
        try:
            if declared is not None and declared > limit:
                raise body_too_large(limit, declared)  # answered before the body is read (or 100-continue sent)
            return await read_body(receive, limit)
        except ApiError:
            self.metrics.rejected.labels("body_too_large").inc()
            raise

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(400, TOO_DEEP) from None
        if not isinstance(data, dict):
            self.metrics.rejected.labels("invalid").inc()
            raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
        return data

    def _route_for(self, data: dict[str, Any]) -> Route:
        model = data.get("model")
        route = self.routes.get(model) if isinstance(model, str) else None
        if route is not None:
            return route
        self.metrics.rejected.labels("invalid").inc()
        known = self._known_models
        if model is None:
            raise ApiError(400, f"'model' is required; known models: {known}", param="model")
        if not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string; known models: {known}", param="model")
        raise ApiError(404, f"model {model!r} does not exist; known models: {known}",
                       param="model", code="model_not_found")

    def _models_listing(self) -> bytes:
        created = int(time.time())
        # As vLLM lists them: an adapter's root is its source and its parent the base model's name.
        data = [{"id": name, "object": "model", "created": created, "owned_by": "qwen-serve",
                 "root": route.adapter.source if route.adapter else route.profile.model,
                 "parent": route.profile.served_model_name if route.adapter else None,
                 "max_model_len": route.profile.max_model_len}
                for name, route in sorted(self.routes.items())]
        return json.dumps({"object": "list", "data": data}).encode()


def create_app(config: ProxyConfig, environ: Mapping[str, str] = os.environ,
               registry: CollectorRegistry | None = None) -> ProxyApp:
    return ProxyApp(config, environ, registry)
