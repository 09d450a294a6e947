"""No client input gets a 5xx or a traceback: any valid JSON value in any field of a chat or
completions body (lone surrogates, NUL, huge numbers, deep nesting, wrong types), whole bodies of
any JSON, and bytes that are not JSON at all, sent through the proxy's application to a healthy
scripted upstream. And when the proxy itself fails (a bug, injected here), the last resort: a JSON
500 with a request id, counted, its traceback logged at most once per interval."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.last_resort import InternalErrors
from tests.serving.inprocess import Answer, Stack, call

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PLACEHOLDER = '"__value__"'


class Records(logging.Handler):
    """Every log record at WARNING or above, from any logger (the proxy's, aiohttp's, asyncio's)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records
                if r.levelno >= logging.ERROR or r.exc_info is not None]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[asyncio.Runner, Stack]]:
    runner = asyncio.Runner()
    stack = Stack()

    async def start() -> None:
        url = await stack.start_upstream()
        await stack.start({"models": [{"profile": "tiny-qwen3", "backends": [url]}],
                           "health_interval_seconds": 3600, "forward_paths": ["/v1/embeddings"]})

    runner.run(start())
    yield runner, stack
    runner.run(stack.stop())
    runner.close()


@pytest.fixture(scope="module")
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def send(stack: tuple[asyncio.Runner, Stack], path: str, body: bytes,
         headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    runner, running = stack
    assert running.app is not None
    return runner.run(call(running.app, "POST", path, body, headers))


# ---- the case ----------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "user": "\ud800"}),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "a\udfffb"}], "max_tokens": 2}),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}],
            "max_tokens": 2}),
    (COMPLETIONS, {"model": "tiny", "prompt": "\udc00", "max_tokens": 2}),
    (COMPLETIONS, {"model": "tiny", "prompt": ["\ud800", "x"], "max_tokens": 2}),
], ids=["user", "content", "content-part", "prompt", "prompt-batch"])
def test_a_lone_surrogate_is_served(stack: tuple[asyncio.Runner, Stack], records: Records, path: str,
                                    body: dict[str, Any]) -> None:
    """Valid JSON ("\\ud800" is a legal escape) that prefix-affinity hashing used to refuse with a
    text/plain 500 and a traceback per request (issue 24)."""
    records.records.clear()
    answer = send(stack, path, json.dumps(body).encode())
    assert answer.status == 200, answer.body
    assert records.errors() == []


# ---- any value in any field ----------------------------------------------------------------------

TEXT = st.one_of(st.sampled_from(["\ud800", "a\udfffb", "\x00", "a\x00b", "\ud83d\ude00", "", "tiny", "user"]),
                 st.text(st.characters(exclude_categories=[]), max_size=12))  # lone surrogates included
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,  # floats: NaN and Infinity too
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
LIMIT = sys.getrecursionlimit()
JSON_TEXT = st.one_of(
    TEXT.map(json.dumps),
    VALUES.map(json.dumps),
    VALUES.map(lambda v: json.dumps(v, ensure_ascii=False)),  # raw UTF-8 (surrogates then are not UTF-8)
    st.integers(1, 4400).map(lambda digits: "9" * digits),  # beyond Python's 4,300-digit int limit too
    st.sampled_from(["1e999", "-1e999", "1e-999", "-0.0", "123456789012345678901234567890.5", "NaN",
                     "-Infinity", "[]", "{}", '""', "0", "-1", "true", "null"]),
    st.integers(1, LIMIT + 200).map(lambda depth: "[" * depth + "]" * depth),  # past the parser's depth
    st.integers(1, LIMIT + 200).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
)
MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a", "reasoning_content": "r"}, {"role": "user", "content": "v"}]
CHAT_FIELDS = ["model", "messages", "stream", "stream_options", "temperature", "top_p", "top_k", "min_p",
               "max_tokens", "max_completion_tokens", "stop", "stop_token_ids", "chat_template_kwargs",
               "enable_thinking", "enable_search", "incremental_output", "result_format", "n", "seed", "user",
               "tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "logit_bias",
               "presence_penalty", "frequency_penalty", "repetition_penalty", "prediction", "metadata"]
COMPLETION_FIELDS = ["model", "prompt", "stream", "stream_options", "temperature", "top_p", "top_k", "max_tokens",
                     "stop", "stop_token_ids", "n", "seed", "user", "echo", "logprobs", "best_of", "suffix"]
# Inside the messages: the fields prefix affinity, the reasoning rename and shaping read.
MESSAGE_PATHS = [("messages", 0, "role"), ("messages", 1, "role"), ("messages", 1, "content"),
                 ("messages", 2, "reasoning_content"), ("messages", 2, "reasoning"), ("messages", 0),
                 ("messages", 1, "content", 0, "text"), ("messages", 1, "content", 0)]


def body_with(path: str, where: tuple[str | int, ...], stream: bool, value: str) -> bytes:
    """A valid request body whose value at `where` is the JSON text `value` (written as is)."""
    base: dict[str, Any] = ({"model": "tiny", "messages": json.loads(json.dumps(MESSAGES))} if path == CHAT
                            else {"model": "tiny", "prompt": "once upon"})
    base.update(max_tokens=3, stream=stream)
    if where[:4] == ("messages", 1, "content", 0):
        base["messages"][1]["content"] = [{"type": "text", "text": "u"}]
    node: Any = base
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = "__value__"
    return json.dumps(base).replace(PLACEHOLDER, value).encode("utf-8", "surrogatepass")


def check(answer: Answer, records: Records) -> None:
    assert answer.status < 500, answer.body[:500]
    assert answer.complete and not answer.aborted
    if answer.status >= 400:
        assert set(answer.json()) == {"error"}
    assert records.errors() == []


PLACES = ([(CHAT, (name,)) for name in CHAT_FIELDS] + [(CHAT, where) for where in MESSAGE_PATHS]
          + [(COMPLETIONS, (name,)) for name in COMPLETION_FIELDS])


@pytest.mark.parametrize(("path", "where"), PLACES,
                         ids=[f"{'chat' if p == CHAT else 'completions'}-{'.'.join(map(str, w))}" for p, w in PLACES])
@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=JSON_TEXT, stream=st.booleans())
def test_any_value_in_any_field_never_gets_a_5xx(stack: tuple[asyncio.Runner, Stack], records: Records, path: str,
                                                 where: tuple[str | int, ...], value: str, stream: bool) -> None:
    records.records.clear()
    check(send(stack, path, body_with(path, where, stream, value)), records)


BODIES = st.one_of(
    JSON_TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.sampled_from(CHAT_FIELDS) | TEXT, VALUES, max_size=8).map(
        lambda d: json.dumps({"model": "tiny", **d}).encode()),
    st.binary(max_size=64),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=BODIES, path=st.sampled_from([CHAT, COMPLETIONS, "/v1/embeddings", "/v1/models", "/v1/other"]))
def test_any_body_never_gets_a_5xx(stack: tuple[asyncio.Runner, Stack], records: Records, body: bytes,
                                   path: str) -> None:
    records.records.clear()
    check(send(stack, path, body), records)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_nesting_at_every_depth_around_the_limit_is_answered(stack: tuple[asyncio.Runner, Stack], records: Records,
                                                             path: str) -> None:
    """Each depth from well within to past Python's recursion limit, in a field and as the whole body:
    whichever step (parsing, re-encoding, the backend) reaches its limit first, it is a 400."""
    in_field: dict[int, int] = {}
    for depth in range(LIMIT - 150, LIMIT + 20):
        records.records.clear()
        check(send(stack, path, ("[" * depth + "]" * depth).encode()), records)
        answer = send(stack, path, body_with(path, ("metadata",), False, "[" * depth + "]" * depth))
        check(answer, records)
        in_field[depth] = answer.status
    assert in_field[LIMIT - 150] == 200 and in_field[LIMIT + 19] == 400  # both sides of the limit were reached


# ---- the last resort -----------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def metric(stack: tuple[asyncio.Runner, Stack], sample: str) -> float:
    assert stack[1].app is not None
    for line in stack[1].app.metrics.exposition().decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_an_unexpected_exception_is_a_json_500_with_a_request_id(
        stack: tuple[asyncio.Runner, Stack], records: Records, monkeypatch: pytest.MonkeyPatch) -> None:
    app = stack[1].app
    assert app is not None
    clock = Clock()
    monkeypatch.setattr(app, "internal_errors", InternalErrors(app.metrics.internal_errors, interval=10, clock=clock))

    def broken(*_: object, **__: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr("serving.app.shape", broken)
    before = metric(stack, 'qwen_proxy_internal_errors_total{route="chat"}')
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}).encode()
    records.records.clear()
    answers = [send(stack, CHAT, body) for _ in range(3)]
    clock.now += 10
    answers.append(send(stack, CHAT, body))

    for answer in answers:
        assert answer.status == 500 and answer.headers["connection"] == "close"
        error = answer.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "internal_error"
        assert f"request id {answer.headers['x-request-id']}" in error["message"]
    assert len({a.headers["x-request-id"] for a in answers}) == 4
    assert metric(stack, 'qwen_proxy_internal_errors_total{route="chat"}') == before + 4
    logged = [r for r in records.records if r.name == "serving" and r.levelno == logging.ERROR]
    # The first with its traceback; the two within the interval only counted; then the next one.
    assert len(logged) == 2 and all(r.exc_info is not None for r in logged)
    assert answers[0].headers["x-request-id"] in logged[0].getMessage()
    assert answers[3].headers["x-request-id"] in logged[1].getMessage()
    assert "2 more since the last report" in logged[1].getMessage()


def test_an_exception_mid_stream_ends_it_with_an_error_event_and_closes(
        stack: tuple[asyncio.Runner, Stack], records: Records, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.openai_stream import StreamRelay

    def failing(relay: StreamRelay, data: bytes) -> bytes:
        raise ValueError("a bug in the relay")  # on the first read: the head has gone out, nothing else

    monkeypatch.setattr(StreamRelay, "feed", failing)
    records.records.clear()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "stream": True}
    answer = send(stack, CHAT, json.dumps(body).encode())
    assert answer.status == 200 and answer.complete and answer.aborted
    events = answer.events()
    assert len(events) == 1 and answer.headers["content-type"].startswith("text/event-stream")
    error = json.loads(events[0].removeprefix("data: "))["error"]
    assert error["code"] == "internal_error" and "request id" in error["message"]
    assert len([r for r in records.records if r.exc_info is not None]) == 1


def test_a_started_body_that_is_not_a_stream_is_cut() -> None:
    """A forwarded body (not SSE) cannot carry an error: it is left incomplete and the connection
    closed, so the client cannot take it for a whole answer."""
    from prometheus_client import CollectorRegistry, Counter

    from serving.http_io import Hangup
    from tests.serving.inprocess import FakeCycle

    sent: list[object] = []

    async def send_(message: object) -> None:
        sent.append(message)

    hangup = Hangup()
    hangup.cycle = cycle = FakeCycle()
    errors = InternalErrors(Counter("x_internal_errors", "x", ["route"], registry=CollectorRegistry()))
    asyncio.run(errors.answer("other", ValueError("x"), send_, hangup, started=True, stream=False))
    assert sent == [] and cycle.closed == [True] and cycle.disconnected
