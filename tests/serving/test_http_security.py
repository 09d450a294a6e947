"""The proxy as a security reviewer tries it: requests that must never reach a backend in any other
form than the one received and checked. Each case asserts the client's answer AND what the
(counting) upstream saw: smuggling through an encoded path, framing conflicts the parser must
refuse, oversized heads, trailers posing as headers, a pipelining flood, 100-continue before auth.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.conftest import Service, start_proxy, start_scripted_upstream
from tests.serving.test_http_protocol import Client, Reply, chunked, request

pytestmark = pytest.mark.e2e

KEY = "sk-security-0b7e"
AUTH = f"Authorization: Bearer {KEY}\r\n"
CHAT = "/v1/chat/completions"
BODY = b'{"model": "tiny-qwen3", "x": 1}'
MAX_PIPELINED = 16  # serving/http_protocol.py


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    """ONE counting upstream and ONE proxy with an API key in front of it."""
    log_dir = tmp_path_factory.mktemp("http-security")
    backend = start_scripted_upstream(log_dir)
    keys = log_dir / "keys"
    keys.write_text(KEY + "\n")
    config = {"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}],
              "auth": {"api_keys_file": str(keys)}, "health_interval_seconds": 3600}
    path = log_dir / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    proxy = start_proxy(["--config", str(path)], log_dir, ready_path="/health")
    yield proxy, backend
    proxy.stop()
    backend.stop()


def seen(backend: Service) -> list[str]:
    return list(httpx.get(f"{backend.base_url}/stats", timeout=10).json()["seen"])


def exchange(stack: tuple[Service, Service], data: bytes) -> tuple[Reply, list[str]]:
    """Send raw bytes on a new connection; the first answer and what the backend saw meanwhile."""
    proxy, backend = stack
    before = len(seen(backend))
    with Client.connect(proxy) as client:
        client.send(data)
        reply = client.reply()
    return reply, seen(backend)[before:]


def error(reply: Reply) -> tuple[int, str]:
    body = reply.json()
    return reply.status, body["error"]["message"]


# ---- smuggling through the path ------------------------------------------------------------------

def test_the_reported_smuggling_request_reaches_no_backend(stack: tuple[Service, Service]) -> None:
    """The issue's request: a path that decodes to a second request line."""
    data = (b"POST /v1/x%20HTTP/1.1%0d%0aHost:%20b%0d%0aContent-Length:%200%0d%0a%0d%0aGET%20/v1/models HTTP/1.1\r\n"
            b"Content-Type: application/json\r\n" + AUTH.encode() + b"Content-Length: 31\r\n\r\n" + BODY)
    reply, backend_saw = exchange(stack, data)
    assert error(reply) == (400, "the request path has control characters or spaces once percent-decoded")
    assert reply.header("connection") == "close"
    assert backend_saw == []


@pytest.mark.parametrize("path", ["/v1/embeddings%0d%0aX:%20y", "/v1/embe%20ddings", "/v1/embeddings%00",
                                  "/v1/embeddings%09"])
def test_encoded_control_characters_or_spaces_in_the_path_are_400(stack: tuple[Service, Service],
                                                                    path: str) -> None:
    reply, backend_saw = exchange(stack, request("POST", path, BODY, headers={"Authorization": f"Bearer {KEY}"}))
    assert reply.status == 400 and backend_saw == []


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/x", "/v1/x/../embeddings", "/v1/embeddings/",
                                  "/v1/chat/completions/render", "/v1/%2e%2e/admin"])
def test_only_allowlisted_paths_are_forwarded(stack: tuple[Service, Service], path: str) -> None:
    reply, backend_saw = exchange(stack, request("POST", path, BODY, headers={"Authorization": f"Bearer {KEY}"}))
    assert reply.status == 404 and "no such endpoint" in error(reply)[1]
    assert backend_saw == []


@pytest.mark.parametrize("target", ["/v1/embeddings", "/v1/embeddings?dimensions=%2032&x=1",
                                    "/v1/%65mbeddings"])
def test_allowlisted_path_is_forwarded_as_received(stack: tuple[Service, Service], target: str) -> None:
    reply, backend_saw = exchange(stack, request("POST", target, BODY, headers={"Authorization": f"Bearer {KEY}"}))
    assert reply.status == 200
    assert backend_saw == [f"POST {target}"]  # still percent-encoded, with its query


def test_shaped_routes_forward_their_own_path(stack: tuple[Service, Service]) -> None:
    body = json.dumps({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}],
                       "max_tokens": 1}).encode()
    reply, backend_saw = exchange(stack, request("POST", "/v1/chat/%63ompletions?x=%0d", body,
                                                 headers={"Authorization": f"Bearer {KEY}"}))
    assert reply.status == 200
    assert backend_saw == ["POST /v1/chat/completions"]


# ---- framing the parser must refuse ----------------------------------------------------------------

FRAMING = {
    "cl-and-te": (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 5\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "duplicate-cl": f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 31\r\nContent-Length: 32\r\n\r\n",
    "te-chunked-identity": (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}"
                            "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    "space-before-colon": f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length : 31\r\n\r\n",
    "negative-cl": f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: -31\r\n\r\n",
    "obs-fold": f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}X-A: a\r\n  b\r\nContent-Length: 31\r\n\r\n",
    "bad-chunk-size": f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "nul-in-header": f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}X-A: a\x00b\r\nContent-Length: 31\r\n\r\n",
    "bare-lf": f"POST {CHAT} HTTP/1.1\nHost: x\n{AUTH.strip()}\nContent-Length: 31\n\n",
}


@pytest.mark.parametrize("head", FRAMING.values(), ids=FRAMING.keys())
def test_ambiguous_framing_is_400_and_reaches_no_backend(stack: tuple[Service, Service], head: str) -> None:
    data = head.encode("latin-1") + BODY
    reply, backend_saw = exchange(stack, data)
    status, message = error(reply)
    assert status == 400 and message.startswith("malformed HTTP request: "), message
    assert reply.header("connection") == "close"
    assert backend_saw == []


def test_oversized_head_is_431_and_reaches_no_backend(stack: tuple[Service, Service]) -> None:
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}X-Big: {'a' * 70_000}\r\nContent-Length: 31\r\n\r\n"
    reply, backend_saw = exchange(stack, head.encode() + BODY)
    assert error(reply) == (431, "request line and headers exceed 65536 bytes")
    assert backend_saw == []


# ---- headers only from the head --------------------------------------------------------------------

def test_a_trailer_field_is_not_a_header(stack: tuple[Service, Service]) -> None:
    """The key sent as a trailer after a chunked body does not authenticate the request."""
    body = json.dumps({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}],
                       "max_tokens": 1}).encode()
    data = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + chunked(body) + f"0\r\n{AUTH}\r\n".encode())
    reply, backend_saw = exchange(stack, data)
    assert reply.status == 401 and backend_saw == []


def test_100_continue_only_after_the_key_is_checked(stack: tuple[Service, Service]) -> None:
    proxy, backend = stack
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 31\r\n"
    with Client.connect(proxy) as client:
        client.send((head + "Authorization: Bearer wrong\r\n\r\n").encode())
        reply = client.reply()  # the refusal, not a 100 inviting the body
        assert reply.status == 401 and error(reply)[1] == "invalid API key"
    before = len(seen(backend))
    with Client.connect(proxy) as client:
        client.send((head + AUTH + "\r\n").encode())
        assert client.reply().status == 100
        client.send(BODY)
        assert client.reply().status == 200
    assert seen(backend)[before:] == [f"POST {CHAT}"]


# ---- pipelining ------------------------------------------------------------------------------------

def test_a_pipelining_flood_is_bounded(stack: tuple[Service, Service]) -> None:
    """40 requests in one write: the first runs, MAX_PIPELINED wait, the next is refused with 503
    after their answers, the rest is never read, and the connection closes."""
    proxy, backend = stack
    body = json.dumps({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}],
                       "max_tokens": 1}).encode()
    one = request("POST", CHAT, body, headers={"Authorization": f"Bearer {KEY}"})
    before = len(seen(backend))
    with Client.connect(proxy) as client:
        client.send(one * 40)
        statuses = [client.reply().status for _ in range(MAX_PIPELINED + 2)]
        client.assert_closed()
    assert statuses == [200] * (MAX_PIPELINED + 1) + [503]
    assert seen(backend)[before:] == [f"POST {CHAT}"] * (MAX_PIPELINED + 1)

