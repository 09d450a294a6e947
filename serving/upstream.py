"""Requests to the vLLM backends on aiohttp's client, with failures sorted by what they prove.

What matters for a retry is whether the backend may have started the request:
- `ConnectFailed`: refused or timed out connecting. Nothing was sent: safe to try elsewhere.
- `StaleConnection`: a *reused* keep-alive connection closed before any response byte, the
  routine race with a backend closing an idle connection. Safe to send once more, on a fresh one.
- `BackendReset`: a fresh connection failed after the request went out. The backend may have
  started it (or crashed on it): never retried, never taken alone as proof the backend is down.
- `LocalExhausted`: this process or host ran out of descriptors or buffers: the proxy's own limit.
"""

from __future__ import annotations

import json
import logging
import ssl
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from serving.resources import exhausted

log = logging.getLogger("serving")
# vLLM closes idle keep-alive connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): dropping ours
# first keeps the reuse race rare.
KEEPALIVE_SECONDS = 4.0
HEALTH_TIMEOUT_SECONDS = 2.0
JSON_HEADERS = {"content-type": "application/json"}
# Only what the proxy itself sets reaches a backend; no compression on the token path.
SKIP_HEADERS = ("User-Agent", "Accept-Encoding")


class UpstreamError(Exception):
    """A backend exchange that failed before any response head."""


class ConnectFailed(UpstreamError):
    pass


class StaleConnection(UpstreamError):
    pass


class BackendReset(UpstreamError):
    pass


class LocalExhausted(UpstreamError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Attempt:
    """Whether one attempt's connection had carried a request before."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


# The attempt being connected, in the task sending it (aiohttp connects inside the caller's task).
_ATTEMPT: ContextVar[Attempt | None] = ContextVar("attempt", default=None)


class PoolConnector(aiohttp.TCPConnector):
    """Notes whether the connection it hands out is one it handed out before (from the pool).

    aiohttp's request tracing tells the same, but builds and awaits a dozen trace events per
    request to do it; this is one set lookup."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[object] = weakref.WeakSet()  # protocols of live connections

    async def connect(self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout) -> Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        attempt = _ATTEMPT.get()
        if protocol in self._handed_out:
            if attempt is not None:
                attempt.reused = True
        elif protocol is not None:
            self._handed_out.add(protocol)
        return connection


@dataclass(frozen=True)
class Reach:
    """What a request to one backend carries besides its URL: a discovered backend is an address of
    the configured host name, which stays in Host and in TLS (SNI and certificate check); the URL's
    userinfo becomes basic auth (the backend's URL, its label in metrics and logs, has none)."""

    host: str | None = None  # the Host header: the configured URL's host[:port]
    server_hostname: str | None = None  # TLS: the name sent (SNI) and checked in the certificate
    authorization: str | None = None  # from the URL's userinfo
    headers: dict[str, str] = field(init=False)  # of a request with a body
    probe_headers: dict[str, str] = field(init=False)  # of a GET

    def __post_init__(self) -> None:
        extra = {"Host": self.host} if self.host else {}
        if self.authorization:
            extra["Authorization"] = self.authorization
        object.__setattr__(self, "headers", {**JSON_HEADERS, **extra})
        object.__setattr__(self, "probe_headers", extra)


PLAIN = Reach()


class Upstream:
    """The proxy's HTTP clients: one pooled session for requests, one for health checks (its own
    kept-alive connection per backend), and one without keep-alive for the retry after a stale
    connection (a guaranteed fresh connection).

    `reach` holds, by backend base URL, what requests to it carry besides the URL (discovery fills
    it); `context` each backend's max_model_len, read from its /v1/models when it is first found
    healthy (and again after it was down: a restart may change it)."""

    def __init__(self, health_interval: float = 0.0, ssl_context: ssl.SSLContext | None = None) -> None:
        common = {"auto_decompress": False, "skip_auto_headers": SKIP_HEADERS,
                  "timeout": aiohttp.ClientTimeout(total=None)}
        tls: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.pooled = aiohttp.ClientSession(
            connector=PoolConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS, ssl=tls), **common)  # type: ignore[arg-type]
        self.fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True, ssl=tls), **common)  # type: ignore[arg-type]
        # The proxy probes every backend every health_interval_seconds: on a kept-alive connection a
        # probe costs it about half the CPU of one that connects and closes. Kept only when the next
        # probe comes before the connection would be dropped idle.
        self.checks = self.fresh
        if health_interval < KEEPALIVE_SECONDS:
            self.checks = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS, ssl=tls),
                **common)  # type: ignore[arg-type]
        self.reach: dict[URL, Reach] = {}
        self.context: dict[URL, int | None] = {}
        self._caps_told: set[tuple[URL, str, int, int]] = set()

    async def close(self) -> None:
        for session in {self.pooled, self.fresh, self.checks}:
            await session.close()

    async def post(self, url: URL, body: bytes, connect_seconds: float, fresh: bool,
                   base: URL | None = None) -> aiohttp.ClientResponse:
        """Send the request and read the response head; the body is the caller's to read."""
        attempt = Attempt()
        session = self.fresh if fresh else self.pooled
        reach = self.reach.get(base, PLAIN) if self.reach and base is not None else PLAIN
        _ATTEMPT.set(attempt)
        try:
            return await session.post(url, data=body, headers=reach.headers, server_hostname=reach.server_hostname,
                                      timeout=_connect_timeout(connect_seconds))
        except aiohttp.ConnectionTimeoutError:
            raise ConnectFailed(f"no connection within {connect_seconds:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise _classified(exc, ConnectFailed(f"cannot connect: {exc.strerror or exc}")) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if attempt.reused:
                raise StaleConnection(str(exc)) from None
            raise _classified(exc, BackendReset("the backend closed the connection after receiving the "
                                                "request, before answering")) from None
        except aiohttp.ClientResponseError as exc:
            raise BackendReset(f"the backend sent a malformed response head: {exc.message}") from None

    async def healthy(self, base: URL) -> bool | None:
        """GET /health: True/False, or None when this process could not even try (its own limits).

        A probe whose connection fails is made once more on a fresh connection, which decides: the
        failure may be that of a kept-alive connection the backend had just closed, which says
        nothing about the backend. A backend found healthy for the first time (or again after it was
        down) is asked its max_model_len before this returns: it takes no request before that."""
        healthy = await self._health(base)
        if healthy and base not in self.context:
            await self._read_context(base)
        elif healthy is False:
            self.context.pop(base, None)
        return healthy

    async def _health(self, base: URL) -> bool | None:
        try:
            return await self._probe(self.checks, base)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            pass
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return None if exhausted(exc) else False
        try:
            return await self._probe(self.fresh, base)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return None if exhausted(exc) else False

    async def _probe(self, session: aiohttp.ClientSession, base: URL) -> bool:
        reach = self.reach.get(base, PLAIN)
        async with session.get(base / "health", timeout=_HEALTH_TIMEOUT, headers=reach.probe_headers,
                               server_hostname=reach.server_hostname) as response:
            await response.read()
            return response.status == 200

    async def _read_context(self, base: URL) -> None:
        """The backend's max_model_len from its /v1/models (vLLM's and SGLang's model cards carry it);
        None when it answers without one. Not stored when it could not be asked: the next probe asks."""
        reach = self.reach.get(base, PLAIN)
        try:
            async with self.checks.get(base / "v1" / "models", timeout=_HEALTH_TIMEOUT, headers=reach.probe_headers,
                                       server_hostname=reach.server_hostname) as response:
                payload = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return
        self.context[base] = length = context_length(payload) if status == 200 else None
        if length is None:
            log.info("%s: /v1/models answered %d without max_model_len: a max_tokens the proxy fills in from "
                     "the profile is sent as it is", base, status)

    def context_length(self, base: URL) -> int | None:
        return self.context.get(base)

    def note_cap(self, base: URL, model: str, default: int, limit: int) -> None:
        """Say once per backend (and figures) that a profile's default max_tokens is lowered there."""
        key = (base, model, default, limit)
        if key not in self._caps_told:
            self._caps_told.add(key)
            log.warning("%s: %s reports max_model_len %d, below the profile's default max_tokens %d: requests "
                        "without max_tokens get max_tokens %d there (lower the profile's default, or start the "
                        "backend with a larger --max-model-len)", model, base, limit, default, limit)

    def keep_reach(self, bases: set[URL]) -> None:
        """Forget what is known of backends that are gone (discovery)."""
        for known in (self.reach, self.context):
            for base in [b for b in known if b not in bases]:
                del known[base]


def context_length(payload: bytes) -> int | None:
    """The max_model_len of a /v1/models answer (the engine's, on its base model's cards)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    cards = data.get("data") if isinstance(data, dict) else None
    lengths = [card.get("max_model_len") for card in cards if isinstance(card, dict)] if isinstance(cards, list) else []
    valid = [n for n in lengths if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    return min(valid) if valid else None


_TIMEOUTS: dict[float, aiohttp.ClientTimeout] = {}
_HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_SECONDS)


def _connect_timeout(seconds: float) -> aiohttp.ClientTimeout:
    # One object per configured value: no allocation per request.
    timeout = _TIMEOUTS.get(seconds)
    if timeout is None:
        timeout = _TIMEOUTS[seconds] = aiohttp.ClientTimeout(total=None, sock_connect=seconds)
    return timeout


def _classified(exc: BaseException, otherwise: UpstreamError) -> UpstreamError:
    name = exhausted(exc)
    return LocalExhausted(name) if name else otherwise
