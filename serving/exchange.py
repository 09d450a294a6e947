"""One request's exchange with a backend: choice, the retries that are safe, relay, failures.

Only an attempt that provably never started is retried (serving/upstream.py says which): a
request that reached vLLM may be what crashes it, and sending it to every replica in turn
would take them all down. Once the client's response has started, nothing is retried; a
failure then is one SSE error event and the end of the stream.

A streamed body is forwarded read by read: each read goes through the SSE relay (which
touches an event only when it must change) and out, with backpressure from the client (a slow
reader stops the reads from the backend until it catches up).

Timeouts are named for what they bound: a stream (or a forwarded body) waits
`first_byte_seconds` for its first byte, then at most `idle_seconds` between two reads; a whole
(non-streamed) answer, whose head vLLM sends only when every token is generated, has
`response_seconds` from the request to its last byte.

Each attempt's outcome is told to the model's backends (`report`, for outlier ejection): a 5xx
the backend produced, a reset or cut after the request went out, or a timeout is a failure; an
answer (2xx, 4xx) a success; a client that left says nothing about the backend.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from serving.backend import Backend
from serving.config import Route
from serving.errors import ApiError, sse_error_event
from serving.http_io import Headers, Send, send_whole
from serving.metrics import Metrics
from serving.openai_shaping import Shaped
from serving.openai_stream import StreamRelay, Usage, nested_error, rewrite_json_response
from serving.resources import WHAT, ThrottledLog
from serving.routing import ModelBackends
from serving.upstream import BackendReset, ConnectFailed, LocalExhausted, StaleConnection, Upstream

SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]
JSON_TYPE = b"application/json"


class BackendStalled(Exception):
    """No byte from the backend for `idle_seconds` mid-stream."""


class Exchange:
    def __init__(self, metrics: Metrics, upstream: Upstream, route: Route, backends: ModelBackends,
                 target: str, shaped: Shaped | None, body: bytes, start: float, key: int | None,
                 max_attempts: int, exhausted_log: ThrottledLog, extra_headers: Headers) -> None:
        self.metrics = metrics
        self.upstream = upstream
        self.route = route
        self.backends = backends
        self.target = target  # path (and query) as forwarded
        self.shaped = shaped
        self.body = body
        self.start = start
        self.key = key  # its place on the model's ring (prefix affinity), or None
        self.max_attempts = max_attempts
        self.exhausted_log = exhausted_log
        self.extra_headers = extra_headers
        self.timeouts = route.entry.timeouts
        self.model = route.served_name
        self.streamed = shaped is None or shaped.stream  # read by read (a stream, or a forwarded body)
        self.sse = shaped is not None and shaped.stream  # server-sent events to the client
        self.started = False  # the response head went to the client

    async def run(self, send: Send) -> int:
        in_flight = self.metrics.model(self.model).in_flight
        in_flight.inc()
        excluded: set[Backend] = set()
        retry_on: Backend | None = None  # a backend whose pooled connection was stale
        try:
            for _ in range(self.max_attempts):
                backend = retry_on or self.backends.pick(excluded, self.key)
                if backend is None:
                    break
                fresh, retry_on = retry_on is not None, None
                backend.in_flight += 1
                try:
                    return await self._attempt(backend, send, fresh)
                except ConnectFailed:
                    # Nothing listens there: down for everyone until its /health answers again.
                    self.metrics.upstream_errors.labels(self.model, "connect").inc()
                    self.backends.set_health(backend, False)
                    excluded.add(backend)
                except StaleConnection:
                    # A pooled connection the backend had closed: routine. Once more, on a fresh
                    # connection to the same backend (a fresh one failing is a BackendReset).
                    self.metrics.upstream_errors.labels(self.model, "stale_connection").inc()
                    retry_on = backend
                except BackendReset as exc:
                    self.metrics.upstream_errors.labels(self.model, "reset").inc()
                    self._outcome(backend, ok=False)
                    raise self._not_retried(str(exc)) from None
                except LocalExhausted as exc:
                    raise self._proxy_limit(exc.name) from None
                finally:
                    backend.in_flight -= 1
            else:
                what = f"{len(excluded)} refused the connection" if excluded else "a pooled connection closed"
                raise ApiError(503, f"model {self.model!r}: gave up after {self.max_attempts} attempts "
                               f"(retries.max_attempts; {what}); retry later", headers={"retry-after": "2"})
            detail = f" ({len(excluded)} refused the connection)" if excluded else ""
            raise ApiError(503, f"no healthy backend for model {self.model!r}{detail}; retry later",
                           headers={"retry-after": "2"})
        finally:
            in_flight.dec()

    def _not_retried(self, what: str) -> ApiError:
        return ApiError(502, f"model {self.model!r}: {what}; not retried, since it may have started the "
                        "request", code="upstream_reset")

    def _proxy_limit(self, name: str) -> ApiError:
        self.metrics.exhausted.labels(name).inc()
        self.exhausted_log.warning(f"{WHAT[name]} ({name}): requests are answered 503 until it recovers; "
                                   "raise the limit (ulimit -n, or more proxy replicas)")
        return ApiError(503, f"{WHAT[name]} ({name}): this is the proxy's own limit, not the model's; "
                        "retry later", code="proxy_overloaded", headers={"retry-after": "1"})

    def _outcome(self, backend: Backend, ok: bool) -> None:
        """What the attempt proved about the backend, for outlier ejection (serving/ejection.py)."""
        self.backends.report(backend, ok)

    def _body_for(self, backend: Backend) -> bytes:
        """The request body for this backend. A max_tokens the proxy filled in from the profile that
        exceeds the backend's max_model_len (its /v1/models) is lowered to it, as the engine would
        refuse every request otherwise; re-encoded only then."""
        defaulted = self.shaped.defaulted_max_tokens if self.shaped is not None else None
        if defaulted is None:
            return self.body
        limit = self.upstream.context_length(backend.base)
        if limit is None or defaulted <= limit:
            return self.body
        assert self.shaped is not None
        try:
            body = json.dumps({**self.shaped.body, "max_tokens": limit}).encode()
        except RecursionError:
            return self.body  # nested as deep as the encoder goes: sent as the client built it
        self.shaped.warnings.append(f"max_tokens: the profile's default {defaulted} lowered to {limit}, the "
                                    "backend's max_model_len; send max_tokens to choose")
        self.upstream.note_cap(backend.base, self.model, defaulted, limit)
        return body

    async def _attempt(self, backend: Backend, send: Send, fresh: bool) -> int:
        url = backend.url_for(self.target)
        streamed = self.streamed
        body = self._body_for(backend)
        response: aiohttp.ClientResponse | None = None
        clean = False  # then the connection goes back to the pool
        # A stream's first byte, or a whole answer's last one (its head comes with it).
        bound = self.timeouts.first_byte_seconds if streamed else self.route.response_seconds
        try:
            try:
                async with asyncio.timeout(bound):
                    response = await self.upstream.post(url, body, self.timeouts.connect_seconds, fresh, backend.base)
                    if response.status != 200 or not streamed:
                        payload = await response.read()  # an error answer, or a whole (non-streamed) answer
                    else:
                        first = await response.content.readany()
            except TimeoutError:
                self.metrics.upstream_errors.labels(self.model, "timeout").inc()
                self._outcome(backend, ok=False)
                raise self._timed_out(streamed) from None
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                self.metrics.upstream_errors.labels(self.model, "reset").inc()
                self._outcome(backend, ok=False)
                raise self._not_retried(f"the backend failed before its answer was complete ({exc})") from None
            if response.status != 200:
                # A 5xx is the backend's failure; anything else its answer (a client's 4xx included).
                self._outcome(backend, ok=response.status < 500)
                status = await self._pass_through(response, payload, send)
            elif not streamed:
                self._outcome(backend, ok=True)
                status = await self._send_whole(payload, send)
            else:
                status = await self._relay(response, first, send, backend)
            clean = True
            return status
        finally:
            if response is not None:
                if clean:
                    self._finish(response)
                else:
                    response.close()  # the backend sees the request end and aborts it (also when the client left)

    def _timed_out(self, streamed: bool) -> ApiError:
        if streamed:
            what = f"sent no first byte within {self.timeouts.first_byte_seconds:g} s (timeouts.first_byte_seconds)"
        else:
            what = (f"did not send its whole answer within {self.route.response_seconds:g} s "
                    "(timeouts.response_seconds); stream a long answer to receive it as it is generated")
        return ApiError(504, f"model {self.model!r} {what}", code="upstream_timeout")

    def _finish(self, response: aiohttp.ClientResponse) -> None:
        """Back to the pool once the body has ended; a backend that never ends it after [DONE] is
        closed after `idle_seconds` (aiohttp releases the connection itself at the end of body)."""
        if response.closed:
            return
        if response.content.at_eof():
            response.release()
            return
        handle = asyncio.get_running_loop().call_later(self.timeouts.idle_seconds, response.close)
        response.content.on_eof(handle.cancel)

    def _our_headers(self) -> Headers:
        headers = list(self.extra_headers)
        if self.shaped is not None:
            if self.shaped.applied:
                headers.append((b"x-qwen-defaults-applied", ",".join(self.shaped.applied).encode()))
            if self.shaped.warnings:
                headers.append((b"x-qwen-warning", "; ".join(self.shaped.warnings).encode()))
        return headers

    async def _pass_through(self, response: aiohttp.ClientResponse, payload: bytes, send: Send) -> int:
        """A backend's error answer goes to the client as sent (a flat SGLang error nested as OpenAI's)."""
        if response.status >= 500:
            self.metrics.upstream_errors.labels(self.model, "http_5xx").inc()
        content_type = response.headers.get("content-type", "application/json").encode("latin-1")
        self.started = True
        await send_whole(send, response.status, nested_error(payload),
                         [(b"content-type", content_type), *self.extra_headers])
        return response.status

    async def _send_whole(self, payload: bytes, send: Send) -> int:
        """A non-streamed answer: the name the client asked for put back, its usage counted."""
        usage = Usage()
        body = rewrite_json_response(payload, self.model, self.route.name, usage)
        usage.record(self.metrics, self.model)
        self.started = True
        await send_whole(send, 200, body, [(b"content-type", JSON_TYPE), *self._our_headers()])
        return 200

    def _stream_relay(self) -> StreamRelay:
        assert self.shaped is not None
        rewrite = None
        if self.route.name != self.model:
            rewrite = (f'"model":"{self.model}"'.encode(), f'"model":"{self.route.name}"'.encode())
        return StreamRelay(self.metrics, self.model, self.start, drop_usage=not self.shaped.client_wants_usage,
                           rewrite=rewrite, completions=self.target.startswith("/v1/completions"))

    async def _relay(self, response: aiohttp.ClientResponse, data: bytes, send: Send, backend: Backend) -> int:
        """Forward the body as it is read: SSE through the relay, other bodies untouched.

        Ends at the stream's [DONE] (clients may close as soon as they read it); what the
        backend sends after it is not waited for."""
        relay = self._stream_relay() if self.shaped is not None else None
        if relay is None:
            content_type = response.headers.get("content-type", "application/json").encode("latin-1")
            headers = [(b"content-type", content_type), *self.extra_headers]
        else:
            headers = [*SSE_HEADERS, *self._our_headers()]
        self.started = True
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        content = response.content
        loop = asyncio.get_running_loop()
        watchdog = Watchdog(loop, content, self.timeouts.idle_seconds)
        # One message object for every chunk: uvicorn reads it and keeps nothing.
        message = {"type": "http.response.body", "body": b"", "more_body": True}
        try:
            while data:
                if relay is None:
                    message["body"] = data
                    await send(message)
                else:
                    out = relay.feed(data)
                    if relay.saw_done:
                        # Count and finish at [DONE], not at the backend's end of body.
                        relay.usage.record(self.metrics, self.model)
                        self._outcome(backend, ok=True)
                        await send({"type": "http.response.body", "body": out + relay.leftover()})
                        return 200
                    if out:
                        message["body"] = out
                        await send(message)
                watchdog.waiting_since = loop.time()
                data = await content.readany()
                watchdog.waiting_since = None
            if relay is None:
                self._outcome(backend, ok=True)
                await send({"type": "http.response.body", "body": b""})
                return 200
            # vLLM always ends a stream with [DONE]: a body without it was cut by the backend.
            raise BackendReset("stream ended without [DONE]")
        except BackendStalled:
            self._outcome(backend, ok=False)
            return await self._failed_mid_stream(response, send, "timeout",
                                                 "the model backend stopped sending: timed out")
        except (BackendReset, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            self._outcome(backend, ok=False)
            return await self._failed_mid_stream(response, send, "reset",
                                                 "the model backend failed mid-response; the answer is incomplete")
        finally:
            watchdog.cancel()

    async def _failed_mid_stream(self, response: aiohttp.ClientResponse, send: Send, kind: str,
                                 message: str) -> int:
        """After the status line went out, an error can only be an SSE event; then the stream ends."""
        response.close()
        self.metrics.upstream_errors.labels(self.model, kind).inc()
        await send({"type": "http.response.body", "body": sse_error_event(message, f"upstream_{kind}")})
        return 200


class Watchdog:
    """Fails a relay whose backend goes silent for `idle` seconds while the relay waits on it.

    Time spent writing to a slow client does not count (`waiting_since` is None then). One
    timer per `idle` period, not one per read: a read only stamps a time."""

    __slots__ = ("content", "handle", "idle", "loop", "waiting_since")

    def __init__(self, loop: asyncio.AbstractEventLoop, content: aiohttp.StreamReader, idle: float) -> None:
        self.loop, self.content, self.idle = loop, content, idle
        self.waiting_since: float | None = None
        self.handle = loop.call_later(idle, self._check)

    def _check(self) -> None:
        since = self.waiting_since
        now = self.loop.time()
        if since is not None and now - since >= self.idle:
            self.content.set_exception(BackendStalled())
            return
        self.handle = self.loop.call_at((since if since is not None else now) + self.idle, self._check)

    def cancel(self) -> None:
        self.handle.cancel()
