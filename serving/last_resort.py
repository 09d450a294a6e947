"""The last resort of the request path: an exception nothing else expected becomes an answer.

Before the response has started, the client gets a JSON 500 in OpenAI's error shape naming a
request id (also in `x-request-id`), and the connection closes. After it started, a stream ends
with one SSE error event naming the id; any other body is cut (the client sees it incomplete
rather than a short answer that looks whole). Either way the proxy keeps serving. Each one is
counted in `qwen_proxy_internal_errors_total{route}`, and logged with its traceback and request id,
at most once per interval: a bug hit by every request must not flood the log.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from serving.errors import error_body, sse_error_event
from serving.http_io import CLOSE, JSON, Hangup, Send

log = logging.getLogger("serving")
LOG_INTERVAL_SECONDS = 10.0
CODE = "internal_error"


class InternalErrors:
    def __init__(self, counter: Any, interval: float = LOG_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = counter  # qwen_proxy_internal_errors, by route
        self.interval = interval
        self._clock = clock
        self._last = float("-inf")
        self._suppressed = 0

    def record(self, route: str, exc: BaseException) -> str:
        """Count and (throttled) log the exception; the request id the client is told."""
        request_id = secrets.token_hex(8)
        self.counter.labels(route).inc()
        now = self._clock()
        if now - self._last < self.interval:
            self._suppressed += 1
            return request_id
        more = f" ({self._suppressed} more since the last report, without traceback)" if self._suppressed else ""
        self._last, self._suppressed = now, 0
        log.error("internal error answering a %s request (request id %s)%s", route, request_id, more, exc_info=exc)
        return request_id

    async def answer(self, route: str, exc: BaseException, send: Send, hangup: Hangup, started: bool,
                     stream: bool) -> None:
        request_id = self.record(route, exc)
        message = f"internal error in the proxy (request id {request_id}); it was logged, retry later"
        try:
            if not started:
                body = error_body(500, message, code=CODE)
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", JSON), (b"x-request-id", request_id.encode()), CLOSE,
                                        (b"content-length", b"%d" % len(body))]})
                await send({"type": "http.response.body", "body": body})
                return
            if stream:
                await send({"type": "http.response.body", "body": sse_error_event(message, CODE, 500)})
        except Exception:  # noqa: BLE001, S110 - the connection is closed below whatever happened
            pass
        hangup.abort()
