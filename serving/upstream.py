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

import weakref
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from serving.resources import exhausted

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


class Upstream:
    """The proxy's HTTP clients: one pooled session for requests, one for health checks (its own
    kept-alive connection per backend), and one without keep-alive for the retry after a stale
    connection (a guaranteed fresh connection)."""

    def __init__(self, health_interval: float = 0.0) -> None:
        common = {"auto_decompress": False, "skip_auto_headers": SKIP_HEADERS,
                  "timeout": aiohttp.ClientTimeout(total=None)}
        self.pooled = aiohttp.ClientSession(
            connector=PoolConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS), **common)  # type: ignore[arg-type]
        self.fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), **common)  # type: ignore[arg-type]
        # The proxy probes every backend every health_interval_seconds: on a kept-alive connection a
        # probe costs it about half the CPU of one that connects and closes. Kept only when the next
        # probe comes before the connection would be dropped idle.
        self.checks = self.fresh
        if health_interval < KEEPALIVE_SECONDS:
            self.checks = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS), **common)  # type: ignore[arg-type]

    async def close(self) -> None:
        for session in {self.pooled, self.fresh, self.checks}:
            await session.close()

    async def post(self, url: URL, body: bytes, connect_seconds: float, fresh: bool) -> aiohttp.ClientResponse:
        """Send the request and read the response head; the body is the caller's to read."""
        attempt = Attempt()
        session = self.fresh if fresh else self.pooled
        _ATTEMPT.set(attempt)
        try:
            return await session.post(url, data=body, headers=JSON_HEADERS, timeout=_connect_timeout(connect_seconds))
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
        nothing about the backend."""
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

    @staticmethod
    async def _probe(session: aiohttp.ClientSession, base: URL) -> bool:
        async with session.get(base / "health", timeout=_HEALTH_TIMEOUT) as response:
            await response.read()
            return response.status == 200


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
