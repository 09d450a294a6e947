"""The proxy's HTTP/1.1 as clients see it (uvicorn's httptools protocol with the proxy's limits,
serving/http_protocol.py), spoken over raw sockets: keep-alive, pipelining, chunked streams,
`Expect: 100-continue`, malformed input, header and body limits, connection close, clients leaving
half-way, percent-encoded paths.

Every read is bounded by the socket's timeout (no sleeps): a test reads until it has what it
expects, and a server that never sends it fails the test with a timeout.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import pytest
import yaml

from tests.conftest import Service, start_proxy, start_scripted_upstream

pytestmark = pytest.mark.e2e

TIMEOUT = 10.0  # the failure bound of every read
MAX_BODY = 2048
CLIENT_IDLE = 2.0  # limits.client_idle_seconds of the module's proxy
MAX_HEADER_BYTES = 64 * 1024
HEADER_LIMIT_MESSAGE = f"request line and headers exceed {MAX_HEADER_BYTES} bytes"
DECLARED_TOO_LARGE = (f"request body of {MAX_BODY + 1} bytes exceeds the limit of {MAX_BODY} bytes "
                      "(limits.max_body_bytes)")
CHAT = "/v1/chat/completions"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ([^\r\n]*)\r\n")
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """ONE scripted upstream and ONE proxy (body limit MAX_BODY) for the module."""
    log_dir = tmp_path_factory.mktemp("http-protocol")
    backend = start_scripted_upstream(log_dir)
    try:
        config = {"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}],
                  "limits": {"max_body_bytes": MAX_BODY, "client_idle_seconds": CLIENT_IDLE},
                  "health_interval_seconds": 0.5}
        path = log_dir / "proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        proxy = start_proxy(["--config", str(path)], log_dir)
        try:
            yield proxy
        finally:
            proxy.stop()
    finally:
        backend.stop()


# ---- a strict HTTP/1.1 client reader -----------------------------------------------------------

@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[bytes] | None = None  # the chunk payloads of a chunked body, in order
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, f"header {name!r} sent {len(values)} times: {self.headers}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    """One raw TCP connection to the proxy; every read waits at most TIMEOUT."""

    sock: socket.socket
    buffer: bytes = field(default=b"")

    @classmethod
    def connect(cls, service: Service, timeout: float = TIMEOUT) -> Client:
        return cls(socket.create_connection(("127.0.0.1", service.port), timeout=timeout))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError(f"the proxy closed the connection; unparsed bytes: {self.buffer[:200]!r}")
        self.buffer += data

    def take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def take_until(self, marker: bytes) -> bytes:
        """The bytes up to and including `marker`."""
        while marker not in self.buffer:
            self._fill()
        end = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def head(self) -> tuple[int, str, list[tuple[str, str]], bytes]:
        raw = self.take_until(b"\r\n\r\n")
        status_line = STATUS_LINE.match(raw)
        assert status_line, f"not an HTTP/1.1 status line: {raw[:200]!r}"
        headers: list[tuple[str, str]] = []
        position = status_line.end()
        while raw[position:] != b"\r\n":
            line = HEADER_LINE.match(raw, position)
            assert line, f"malformed header line in {raw!r} at {position}"
            headers.append((line.group(1).decode().lower(), line.group(2).decode("latin-1")))
            position = line.end()
        return int(status_line.group(1)), status_line.group(2).decode(), headers, raw

    def reply(self, head_only: bool = False) -> Reply:
        """Read one response, framed exactly as its headers say (1xx and HEAD answers have no body)."""
        status, reason, headers, raw = self.head()
        reply = Reply(status, reason, headers, b"", raw_head=raw)
        if status < 200 or head_only:
            return reply
        encoding = reply.header("transfer-encoding")
        length = reply.header("content-length")
        if encoding is not None:
            assert encoding == "chunked", encoding
            assert length is None, "both content-length and transfer-encoding"
            reply.chunks = []
            while True:
                size_line = self.take_until(b"\r\n")
                assert re.fullmatch(rb"[0-9a-f]+\r\n", size_line), f"bad chunk size line {size_line!r}"
                size = int(size_line, 16)
                if size == 0:
                    assert self.take(2) == b"\r\n", "the last chunk is not followed by an empty trailer"
                    break
                reply.chunks.append(self.take(size))
                assert self.take(2) == b"\r\n", "a chunk's data is not followed by CRLF"
            reply.body = b"".join(reply.chunks)
        else:
            assert length is not None, f"a response without framing: {raw!r}"
            reply.body = self.take(int(length))
        return reply

    def assert_closed(self) -> None:
        """The proxy closes the connection: nothing more arrives but the end of the stream."""
        assert self.buffer == b"", f"unexpected bytes after the response: {self.buffer[:200]!r}"
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError("the proxy kept the connection open") from None
        assert data == b"", f"unexpected bytes after the response: {data[:200]!r}"


def request(method: str, path: str, body: bytes | None = None, version: str = "1.1",
            headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chat(max_tokens: int, **extra: Any) -> bytes:
    body = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens}
    return json.dumps({**body, **extra}).encode()


def assert_completion(reply: Reply, max_tokens: int) -> None:
    """A non-streamed chat completion from the scripted upstream for `max_tokens`."""
    assert reply.status == 200, reply
    assert reply.header("content-length") == str(len(reply.body))
    assert reply.header("transfer-encoding") is None
    data = reply.json()
    assert data["object"] == "chat.completion"
    assert data["usage"]["completion_tokens"] == max_tokens
    assert data["choices"][0]["message"]["content"] == " tok" * max_tokens


def assert_health(reply: Reply) -> None:
    assert (reply.status, reply.reason) == (200, "OK")
    assert reply.header("content-type") == "application/json"
    assert reply.header("content-length") == "15"
    assert reply.body == b'{"status":"ok"}'


def assert_error(reply: Reply, status: int, error_type: str) -> str:
    """The OpenAI error shape, exactly; returns the message."""
    assert reply.status == status, reply
    assert reply.header("content-type") == "application/json"
    data = reply.json()
    assert list(data) == ["error"]
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["param"] is None and error["code"] is None
    assert isinstance(error["message"], str) and error["message"]
    return str(error["message"])


def assert_refused_and_closed(client: Client, status: int, message: str) -> None:
    """A refusal in the OpenAI error shape with exactly `message`, then the proxy closes."""
    reply = client.reply()
    assert assert_error(reply, status, "invalid_request_error") == message
    assert reply.header("connection") == "close"
    client.assert_closed()


def health_after(service: Service) -> None:
    """The proxy still answers, on a new connection, and the process is alive."""
    assert service.process.poll() is None, service.log()
    with Client.connect(service) as client:
        client.send(request("GET", "/health"))
        assert_health(client.reply())


# ---- 1. keep-alive -----------------------------------------------------------------------------

def test_keep_alive_serves_requests_in_turn_on_one_connection(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health"))
        first = client.reply()
        assert_health(first)
        assert first.header("connection") is None  # HTTP/1.1: persistent unless said otherwise
        client.send(request("POST", CHAT, chat(3)))
        second = client.reply()
        assert_completion(second, 3)
        assert second.header("connection") is None
        # Exact Content-Length framing: the next bytes on the connection are the next status line.
        client.send(request("GET", "/health"))
        assert_health(client.reply())
        assert client.buffer == b""


# ---- 2. pipelining -----------------------------------------------------------------------------

def test_pipelined_requests_answered_in_order(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health") + request("GET", "/ready") + request("GET", "/nope"))
        assert_health(client.reply())
        ready = client.reply()
        assert ready.status == 200
        assert ready.json()["ready"] is True
        assert "no such path: /nope" in assert_error(client.reply(), 404, "not_found_error")
        client.send(request("GET", "/health"))  # and the connection is still usable
        assert_health(client.reply())


def test_pipelined_posts_each_get_their_own_answer_in_order(service: Service) -> None:
    # The first request is the slowest (its upstream waits before answering): the answers still
    # come in request order, each for its own request.
    slow = chat(2, script="first-byte-delay=0.3")
    with Client.connect(service) as client:
        client.send(request("POST", CHAT, slow) + request("POST", CHAT, chat(5))
                    + request("POST", CHAT, chat(1, stream=True)) + request("GET", "/health"))
        assert_completion(client.reply(), 2)
        assert_completion(client.reply(), 5)
        streamed = client.reply()
        assert streamed.status == 200 and streamed.chunks is not None
        assert streamed.body.endswith(b"data: [DONE]\n\n")
        assert_health(client.reply())


# ---- 3. streamed responses ---------------------------------------------------------------------

def test_streamed_response_is_chunked_sse_then_connection_reused(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("POST", CHAT, chat(3, stream=True)))
        reply = client.reply()  # reads the chunks up to and including the terminating 0-chunk
        assert reply.status == 200
        assert reply.header("transfer-encoding") == "chunked"
        assert reply.header("content-length") is None
        assert reply.header("connection") is None
        assert (reply.header("content-type") or "").startswith("text/event-stream")
        assert reply.chunks and all(reply.chunks)
        events = reply.body.split(b"\n\n")
        assert events.pop() == b""  # the body ends with a complete event
        assert events[-1] == b"data: [DONE]"
        tokens = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
        assert all(event.startswith(b"data: ") for event in events)
        assert [t["choices"][0]["delta"]["content"] for t in tokens] == [" tok"] * 3
        assert [t["choices"][0]["finish_reason"] for t in tokens] == [None, None, "length"]
        client.send(request("POST", CHAT, chat(2)))
        assert_completion(client.reply(), 2)


# ---- 4. Expect: 100-continue -------------------------------------------------------------------

def test_expect_100_continue_answered_before_the_body(service: Service) -> None:
    body = chat(4)
    with Client.connect(service) as client:
        head = request("POST", CHAT, body, headers={"Expect": "100-continue"}).removesuffix(body)
        client.send(head)
        assert client.take(len(CONTINUE)) == CONTINUE  # before any byte of the body was sent
        client.send(body)
        assert_completion(client.reply(), 4)
        client.send(request("POST", CHAT, chat(1)))  # no 100 without Expect
        assert_completion(client.reply(), 1)


# ---- 5. malformed requests ---------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello sent to the plain-text port
    b"HELLO\r\n\r\n",
    b"GET /health HTTP/1.1 trailing\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nnot a header line\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n",
], ids=["tls", "no-request-line", "bad-version", "bad-header", "bad-content-length"])
def test_malformed_request_gets_400_and_close(service: Service, data: bytes) -> None:
    with Client.connect(service) as client:
        client.send(data)
        reply = client.reply()
        message = assert_error(reply, 400, "invalid_request_error")
        assert message.startswith("malformed HTTP request: ")
        assert reply.header("connection") == "close"
        client.assert_closed()
    health_after(service)


def test_malformed_request_after_a_good_one_on_a_kept_alive_connection(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health"))
        assert_health(client.reply())
        client.send(b"\x00\x01garbage\r\n\r\n")
        assert_error(client.reply(), 400, "invalid_request_error")
        client.assert_closed()


# ---- 6. header size limit ----------------------------------------------------------------------

def test_headers_over_64_kib_get_431_and_close(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health", headers={"X-Big": "a" * (MAX_HEADER_BYTES + 100)}))
        assert_refused_and_closed(client, 431, HEADER_LIMIT_MESSAGE)


def test_many_small_headers_over_64_kib_get_431(service: Service) -> None:
    many = {f"X-H{i}": "v" * 60 for i in range(MAX_HEADER_BYTES // 60 + 10)}
    with Client.connect(service) as client:
        client.send(request("GET", "/health", headers=many))
        assert_refused_and_closed(client, 431, HEADER_LIMIT_MESSAGE)


def test_headers_under_64_kib_are_accepted(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health", headers={"X-Big": "a" * (MAX_HEADER_BYTES - 1024)}))
        assert_health(client.reply())


# ---- 7. body size limit ------------------------------------------------------------------------

def padded_chat(size: int) -> bytes:
    """A valid chat request body of exactly `size` bytes."""
    body = chat(1)
    padding = size - len(body)
    assert padding >= 0
    return body[:-1] + b" " * padding + b"}"


def test_body_at_the_limit_is_accepted(service: Service) -> None:
    body = padded_chat(MAX_BODY)
    assert len(body) == MAX_BODY
    with Client.connect(service) as client:
        client.send(request("POST", CHAT, body))
        assert_completion(client.reply(), 1)


@pytest.mark.parametrize("header", ["Content-Type: application/json", "Expect: 100-continue"],
                         ids=["plain", "expect-100-continue"])
def test_declared_too_large_body_gets_413_before_it_is_sent(service: Service, header: str) -> None:
    """With Expect: 100-continue the answer is the 413, never a 100 inviting the body."""
    with Client.connect(service) as client:
        # Only the headers: the proxy must answer without waiting for the 2049 bytes.
        client.send(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{header}\r\n"
                    f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode())
        assert_refused_and_closed(client, 413, DECLARED_TOO_LARGE)
    health_after(service)


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in parts)


def test_chunked_body_under_the_limit_is_assembled(service: Service) -> None:
    body = chat(2)
    thirds = [body[: len(body) // 3], body[len(body) // 3: 2 * len(body) // 3], body[2 * len(body) // 3:]]
    with Client.connect(service) as client:
        client.send(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                    + chunked(*thirds) + b"0\r\n\r\n")
        assert_completion(client.reply(), 2)


def test_chunked_body_growing_past_the_limit_gets_413(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        # 3 x 1000 bytes, never finished: the proxy answers once the body is past 2048 bytes.
        client.send(chunked(b"x" * 1000, b"x" * 1000, b"x" * 1000))
        assert_refused_and_closed(client, 413, f"request body exceeds the limit of {MAX_BODY} bytes "
                                  "(limits.max_body_bytes)")
    health_after(service)


# ---- 8. closing the connection -----------------------------------------------------------------

def test_http_1_0_request_is_answered_then_closed(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health", version="1.0"))
        reply = client.reply()
        assert_health(reply)
        assert reply.header("connection") == "close"
        client.assert_closed()


def test_http_1_0_keep_alive_is_declined_and_said(service: Service) -> None:
    """uvicorn keeps no HTTP/1.0 connection alive: the answer says so, then the connection closes."""
    with Client.connect(service) as client:
        client.send(request("GET", "/health", version="1.0", headers={"Connection": "keep-alive"}))
        reply = client.reply()
        assert_health(reply)
        assert reply.header("connection") == "close"
        client.assert_closed()


def test_http_1_0_post_is_answered_then_closed(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("POST", CHAT, chat(2), version="1.0"))
        reply = client.reply()
        assert_completion(reply, 2)
        assert reply.header("connection") == "close"
        client.assert_closed()


def test_connection_close_is_honoured(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("POST", CHAT, chat(2), headers={"Connection": "close"}))
        reply = client.reply()
        assert_completion(reply, 2)
        assert reply.header("connection") == "close"
        client.assert_closed()


def test_connection_close_after_a_stream(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("POST", CHAT, chat(2, stream=True), headers={"Connection": "close"}))
        reply = client.reply()
        assert reply.status == 200 and reply.header("transfer-encoding") == "chunked"
        assert reply.header("connection") == "close"
        assert reply.body.endswith(b"data: [DONE]\n\n")
        client.assert_closed()


# ---- 9. clients leaving half-way ---------------------------------------------------------------

@pytest.mark.parametrize("partial", [
    b"GET /hea",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Half",
    request("POST", CHAT, chat(2))[:-10],
    f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked(b"{\"mod"),
    request("GET", "/health") + b"GET /ready HTTP/1.1\r\nHo",
], ids=["request-line", "headers", "body", "chunked-body", "after-a-whole-request"])
def test_client_sending_half_a_request_and_leaving(service: Service, partial: bytes) -> None:
    with Client.connect(service) as client:
        client.send(partial)
    health_after(service)
    assert "Traceback" not in service.log()


def test_client_leaving_mid_stream_leaves_the_proxy_healthy(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("POST", CHAT, chat(200, stream=True)))
        assert client.head()[0] == 200
    health_after(service)
    assert "Traceback" not in service.log()


# ---- 10. paths -----------------------------------------------------------------------------------

def test_percent_encoded_path_is_decoded(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/heal%74h"))
        assert_health(client.reply())
        client.send(request("GET", "/heal%74h?x=%20"))  # the query is not part of the path
        assert_health(client.reply())
        client.send(request("GET", "/heal%2574h"))  # decoded once, not twice
        message = assert_error(client.reply(), 404, "not_found_error")
        assert message == "no such path: /heal%74h"


# ---- cases these tests found wrong in the first version of the server --------------------------

@pytest.mark.parametrize("last", [
    request("GET", "/ready", headers={"Connection": "close"}),
    request("GET", "/ready", version="1.0"),
    f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode(),
], ids=["connection-close", "http-1.0", "413"])
def test_pipelined_closing_request_is_still_answered(service: Service, last: bytes) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health") + last)
        first = client.reply()
        assert_health(first)
        assert first.header("connection") is None  # the FIRST request did not ask to close
        second = client.reply()
        assert second.status in (200, 413)
        assert second.header("connection") == "close"
        client.assert_closed()


def test_pipelined_garbage_after_a_whole_request(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health") + b"\x00\x01garbage\r\n\r\n")
        assert_health(client.reply())
        reply = client.reply()
        assert assert_error(reply, 400, "invalid_request_error").startswith("malformed HTTP request: ")
        client.assert_closed()


def test_head_response_has_no_body(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("HEAD", "/health") + request("GET", "/health"))
        head = client.reply(head_only=True)
        assert head.status == 200
        assert_health(client.reply())  # the next bytes are the GET's status line, not a body


def test_upgrade_request_gets_400(service: Service) -> None:
    with Client.connect(service) as client:
        client.send(request("GET", "/health", headers={"Connection": "Upgrade", "Upgrade": "websocket"}))
        reply = client.reply()
        assert assert_error(reply, 400, "invalid_request_error") == "protocol upgrades are not supported"
        client.assert_closed()


@pytest.mark.parametrize("start", [
    # One header line of more than 64 KiB, without the empty line that ends the header section.
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n",
    # A request line of more than 64 KiB, not yet ended.
    b"GET /health?" + b"a" * (MAX_HEADER_BYTES + 100),
], ids=["header", "request-line"])
def test_headers_over_64_kib_refused_before_they_end(service: Service, start: bytes) -> None:
    with Client.connect(service, timeout=3) as client:
        client.send(start)
        assert_refused_and_closed(client, 431, HEADER_LIMIT_MESSAGE)


def test_http_1_0_stream_is_refused_with_505(service: Service) -> None:
    """A stream needs HTTP/1.1's chunked coding; uvicorn would send it to an HTTP/1.0 client anyway."""
    with Client.connect(service) as client:
        client.send(request("POST", CHAT, chat(2, stream=True), version="1.0"))
        reply = client.reply()
        assert "HTTP/1.1" in assert_error(reply, 505, "invalid_request_error")
        client.assert_closed()


def test_expect_value_is_case_insensitive(service: Service) -> None:
    with Client.connect(service, timeout=3) as client:
        client.send(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 10\r\n\r\n"
                    .encode())
        assert client.take(len(CONTINUE)) == CONTINUE


# ---- client idle timeout ---------------------------------------------------------------------

@pytest.mark.parametrize("first", [request("GET", "/health"), b"GET /hea"], ids=["idle-keep-alive", "half-request"])
def test_connection_without_a_whole_request_is_closed_after_the_idle_time(service: Service, first: bytes) -> None:
    with Client.connect(service) as client:
        # Taken before the proxy can start its idle timer (after it reads these bytes, or after the
        # answer), so a slow machine only makes the close later. The proxy times from its event
        # loop's cached clock (libuv's, in whole milliseconds, read at the start of a loop turn),
        # which can run a little behind: half the idle time tells "closed by the idle timer" from
        # "closed at once" without depending on how far behind.
        started = time.monotonic()
        client.send(first)
        if first.endswith(b"\r\n\r\n"):
            assert_health(client.reply())
        client.assert_closed()  # blocks until the proxy closes (the socket timeout bounds the wait)
        assert time.monotonic() - started >= CLIENT_IDLE / 2, "closed long before the idle time"
