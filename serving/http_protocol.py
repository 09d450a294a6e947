"""uvicorn's httptools protocol with the limits a public endpoint needs, and nothing else changed.

uvicorn (its httptools parser, framing, keep-alive, flow control, pipelining order) carries
HTTP. This subclass adds what uvicorn leaves to a proxy in front of it:
- request line and headers capped at 64 KiB: 431, also while they are still arriving (the
  parser buffers an unfinished header line without bound);
- at most MAX_PIPELINED requests waiting behind a busy one on a connection: 503 for the rest;
- trailer fields after a chunked body are dropped (uvicorn appends them to the request's
  headers, past every check made on those);
- a connection holding part of a request, or nothing at all, for `client_idle_seconds` is
  closed (uvicorn's keep-alive timer only runs after a response);
- protocol upgrades refused with 400;
- a lost connection reaches the request's handler at once (the `Hangup` in its scope), rather
  than through a task per request waiting on `receive()`, and the handler can end the connection
  through it (`Hangup.abort`);
- while the proxy drains (`DrainState.draining`), a connection with nothing to answer is closed
  once it has been idle DRAIN_IDLE_SECONDS since the drain began or its last answer, not at once
  (that would race a client sending on it), and not after the usual keep-alive time.
A refusal is answered in order: after the answers to the requests before it, then the
connection closes. Errors are JSON in OpenAI's shape, like every other answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from serving.errors import error_body
from serving.http_io import HANGUP, Hangup

log = logging.getLogger("serving")

MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 16
HEADER_LIMIT = f"request line and headers exceed {MAX_HEADER_BYTES} bytes"
# While draining, how long a connection with nothing to answer is kept: long enough that a client
# which just read an answer and sends its next request is not cut mid-send, short enough that the
# drain ends soon after the last answer. Clients that honour `connection: close` never wait on it.
DRAIN_IDLE_SECONDS = 2.0


class DrainState(ServerState):
    """uvicorn's state shared by every connection, and whether the proxy is draining."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ProxyHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_seconds = float(self.config.timeout_keep_alive)
        self._in_head = False
        self._head_bytes = 0  # request line and header fields parsed so far (exact)
        self._unfinished_bytes = 0  # bytes of reads that ended inside the head (an upper bound)
        self._body_bytes = 0  # body bytes in the current read
        self._stopped = False  # nothing more is parsed on this connection
        self._refusal: Refusal | None = None  # answered once the earlier requests are
        self._idle: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._hangup = Hangup()  # the current request's (each request gets its own)
        state = self.server_state
        self._drain_state = state if isinstance(state, DrainState) else None
        if self.draining:
            self.timeout_keep_alive = DRAIN_IDLE_SECONDS  # type: ignore[assignment]  # a float works

    @property
    def draining(self) -> bool:
        return self._drain_state is not None and self._drain_state.draining

    def drain(self) -> None:
        """The proxy started draining: from now on an idle connection is closed after DRAIN_IDLE_SECONDS."""
        self.timeout_keep_alive = DRAIN_IDLE_SECONDS  # type: ignore[assignment]  # after each answer, by uvicorn
        now = self.loop.time()
        if self.timeout_keep_alive_task is not None:  # idle after an answer: its time counts from now
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = self.loop.call_later(DRAIN_IDLE_SECONDS, self.timeout_keep_alive_handler)
        elif self.cycle is None and not self._in_head:  # connected, nothing sent yet
            self._last_read = max(self._last_read, now)
            self._cancel_idle()
            self._arm_idle(DRAIN_IDLE_SECONDS)

    # ---- connection ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._last_read = self.loop.time()
        self._arm_idle(self._never_sent_limit())  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_idle()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # uvicorn's mark: lost before the answer completed
            hangup: Hangup = cycle.scope["extensions"][HANGUP]  # type: ignore[assignment]  # ours, not a dict
            hangup.fire()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return  # after a refusal: the connection closes once the earlier answers are out
        self._unset_keepalive_if_required()
        self._last_read = self.loop.time()
        self._body_bytes = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(Refusal(400, "protocol upgrades are not supported"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._refuse(cause if isinstance(cause, Refusal) else
                         Refusal(400, f"malformed HTTP request: {_reason(exc)}"))
            return
        if self._in_head:
            # httptools holds an unfinished header line without reporting it: bound it by the reads.
            # A read may also hold the end of the request before (its body is subtracted).
            self._unfinished_bytes += len(data) - self._body_bytes
            if self._unfinished_bytes > MAX_HEADER_BYTES:
                self._refuse(Refusal(431, HEADER_LIMIT))
                return
        if self._idle is None and self._waiting_on_client():
            self._arm_idle(self.idle_seconds)

    # ---- parser callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._hangup = Hangup()
        self.scope["extensions"] = {HANGUP: self._hangup}  # type: ignore[dict-item]  # uvicorn types extensions as dicts
        self._in_head = True
        self._head_bytes = self._unfinished_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field: never part of the request the proxy checked
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._unfinished_bytes = 0
        if self.parser.should_upgrade():
            raise Refusal(400, "protocol upgrades are not supported")
        latest = self.cycle
        super().on_headers_complete()
        self._hangup.cycle = self.cycle
        if len(self.pipeline) > MAX_PIPELINED:
            self.pipeline.popleft()  # the request just parsed: never started
            self.cycle = latest
            raise Refusal(503, f"more than {MAX_PIPELINED} pipelined requests wait on this connection; "
                          "send the others after their answers or on another connection")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None and not self._busy():
            self._answer(self._refusal)

    # ---- limits ----------------------------------------------------------------------------------
    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEADER_BYTES:
            raise Refusal(431, HEADER_LIMIT)

    def _busy(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _refuse(self, refusal: Refusal) -> None:
        """Stop parsing; answer the refusal now, or after the answers still owed."""
        self._stopped = True
        self._cancel_idle()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_complete:
            # The refusal is about this request's own body.
            queued = next((entry for entry in self.pipeline if entry[0] is cycle), None)
            if queued is not None:
                self.pipeline.remove(queued)  # never started
            elif not cycle.response_started:
                cycle.disconnected = True  # its handler stops waiting for the rest of the body
                cycle.message_event.set()
                self._answer(refusal)
                return
            else:
                cycle.keep_alive = False  # it answered already; close after it
                return
        if self._busy():
            self._refusal = refusal
        else:
            self._answer(refusal)

    def _answer(self, refusal: Refusal) -> None:
        if self.transport.is_closing():
            return
        body = error_body(refusal.status, refusal.message)
        head = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    # ---- idle clients ----------------------------------------------------------------------------
    def _waiting_on_client(self) -> bool:
        """Part of a request is in, and the rest is the client's to send."""
        cycle = self.cycle
        return self._in_head or (cycle is not None and cycle.more_body and not cycle.response_complete)

    def _arm_idle(self, delay: float) -> None:
        # One timer that re-arms itself for what is left, rather than a new one per read.
        self._idle = self.loop.call_later(delay, self._on_idle)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        never_sent = self.cycle is None and not self._in_head
        if self.transport.is_closing() or not (never_sent or self._waiting_on_client()):
            return  # a request is being answered; after it, uvicorn's keep-alive timer takes over
        limit = self._never_sent_limit() if never_sent else self.idle_seconds
        left = self._last_read + limit - self.loop.time()
        if left > 0:
            self._arm_idle(left)
        else:
            self.transport.close()

    def _never_sent_limit(self) -> float:
        """How long a connection may stay without sending a byte: as any idle one while draining."""
        return min(self.idle_seconds, DRAIN_IDLE_SECONDS) if self.draining else self.idle_seconds


def _reason(exc: httptools.HttpParserError) -> str:
    text = str(exc)
    return text or type(exc).__name__
