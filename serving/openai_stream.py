"""Per-response work on the engine's output: SSE events forwarded as they arrive, touched only when needed.

Most streamed events pass through as the same bytes. An event is changed only to give the
reasoning under both names clients read (vLLM sends `reasoning`, SGLang `reasoning_content`, the
field DashScope/DeepSeek clients read: whichever came, the other is added beside it), to name the
alias the client asked for, or to drop the usage event the client did not ask for.
"""

from __future__ import annotations

import json
from json.decoder import scanstring  # type: ignore[attr-defined]  # the C string scanner json uses
from time import perf_counter
from typing import Any

from serving.metrics import Metrics

EVENT_END = b"\n\n"
CHUNK_END = b"}]}\n\n"  # an event ending with a non-empty `choices` list: never the usage event (choices [])
DONE = b"data: [DONE]"
REASONING_KEY = '"reasoning":"'
REASONING_MARK = REASONING_KEY.encode()
REASONING_CONTENT_KEY = '"reasoning_content":"'  # SGLang's name (never contains REASONING_KEY)
REASONING_CONTENT_MARK = REASONING_CONTENT_KEY.encode()
REASONING_PREFIX = b'"reasoning'  # the start of both names
USAGE_MARK = b'"usage":{'
EMPTY_CHOICES = b'"choices":[]'
CONTENT_MARK, EMPTY_CONTENT = b'"content":"', b'"content":""'
TEXT_MARK, EMPTY_TEXT = b'"text":"', b'"text":""'
TOOL_CALLS_MARK = b'"tool_calls":['


def add_reasoning_content(event: bytes) -> bytes:
    """Copy the JSON string after `"reasoning":` into a `reasoning_content` key, byte for byte."""
    return _copy_string(event, REASONING_KEY, ',"reasoning_content":')


def add_reasoning(event: bytes) -> bytes:
    """Copy the JSON string after `"reasoning_content":` into a `reasoning` key (SGLang's events)."""
    return _copy_string(event, REASONING_CONTENT_KEY, ',"reasoning":')


def _copy_string(event: bytes, key: str, new_key: str) -> bytes:
    text = event.decode()
    out: list[str] = []
    start = 0
    while (found := text.find(key, start)) != -1:
        value_start = found + len(key) - 1  # at the opening quote
        _, value_end = scanstring(text, value_start + 1)
        out.append(text[start:value_end])
        out.append(new_key + text[value_start:value_end])
        start = value_end
    out.append(text[start:])
    return "".join(out).encode()


class Usage:
    __slots__ = ("completion", "prompt", "reasoning")

    def __init__(self) -> None:
        self.prompt = self.completion = self.reasoning = 0

    def read(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        self.prompt = int(usage.get("prompt_tokens") or 0)
        self.completion = int(usage.get("completion_tokens") or 0)
        details = usage.get("completion_tokens_details") or {}
        # SGLang also counts them at the top level (its completion_tokens_details may be null).
        self.reasoning = int(details.get("reasoning_tokens") or usage.get("reasoning_tokens") or 0)

    def record(self, metrics: Metrics, model: str) -> None:
        children = metrics.model(model)
        if self.prompt:
            children.prompt_tokens.inc(self.prompt)
        if self.completion:
            children.completion_tokens.inc(self.completion)
        if self.reasoning:
            children.reasoning_tokens.inc(self.reasoning)


class StreamRelay:
    """Turns upstream SSE bytes into client SSE bytes, timing tokens on the way."""

    __slots__ = ("_completions", "_first_answer", "_itl", "_last_token", "_pending", "_rewrite",
                 "_ttfat", "_ttft", "drop_usage", "saw_done", "start", "usage")

    def __init__(self, metrics: Metrics, model: str, start: float, drop_usage: bool,
                 rewrite: tuple[bytes, bytes] | None, completions: bool) -> None:
        self.start = start
        self.drop_usage = drop_usage
        self.usage = Usage()
        self.saw_done = False
        self._rewrite = rewrite
        self._pending = b""
        self._last_token: float | None = None
        self._first_answer = False
        children = metrics.model(model)
        self._ttft, self._ttfat, self._itl = children.ttft, children.ttfat, children.itl
        self._completions = completions

    def feed(self, data: bytes) -> bytes:
        """Bytes to send now for the bytes just read (events are never split or merged further).

        A read usually carries one event, under load several: they are handled as one buffer (a
        few substring scans and counts, no splitting, no copy when the read ends on an event
        boundary, as vLLM's do), up to the end of the stream, whose events are taken one by one
        (the usage event may be dropped)."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        if data.endswith(CHUNK_END):
            # The read ends with a chunk whose last key is a non-empty `choices`, as vLLM writes them.
            # The end of the stream (the usage event, whose choices are empty, then [DONE]) comes after
            # every chunk, so it is not in this read: the two scans for it are skipped.
            return self._buffer(data)
        if not data.endswith(EVENT_END):
            end = data.rfind(EVENT_END)
            if end == -1:
                self._pending = data
                return b""
            self._pending = data[end + 2:]
            data = data[: end + 2]
        # `find` rather than `in` for every scan here: `in` on bytes first tries its operand as an
        # int (raising and clearing a TypeError), which costs more than scanning an event.
        usage, done = data.find(USAGE_MARK), data.find(DONE)
        if usage != -1 or done != -1:
            # The end of the stream is in this read: the events before it as one buffer, then one by one.
            ending = done if usage == -1 else usage if done == -1 else min(usage, done)
            before = data.rfind(EVENT_END, 0, ending)
            if before == -1:
                return self._events(data)
            return self._buffer(data[:before + 2]) + self._events(data[before + 2:])
        return self._buffer(data)

    def _buffer(self, complete: bytes) -> bytes:
        """Whole events none of which ends the stream: copied, touched only where they must change."""
        # Every `"reasoning":"`, `"content":"`, ... is a key: a JSON string escapes its quotes.
        reasoning = 0
        if complete.find(REASONING_PREFIX) != -1:  # one scan for both names; answer-only reads skip the rest
            reasoning = complete.count(REASONING_MARK)
            if reasoning:
                complete = add_reasoning_content(complete)
            elif complete.find(REASONING_CONTENT_MARK) != -1:
                reasoning = complete.count(REASONING_CONTENT_MARK)
                complete = add_reasoning(complete)
        if self._completions:
            answers = complete.count(TEXT_MARK)
            if answers:
                answers -= complete.count(EMPTY_TEXT)
        else:
            answers = complete.count(CONTENT_MARK)
            if answers:
                answers -= complete.count(EMPTY_CONTENT)
            answers += complete.count(TOOL_CALLS_MARK)
        if reasoning or answers:
            self._tokens(reasoning + answers, answers > 0)
        if self._rewrite is not None:
            complete = complete.replace(*self._rewrite)
        return complete

    def _events(self, complete: bytes) -> bytes:
        """Event by event: the usage event is read (and dropped unless asked for), [DONE] noted."""
        events = complete.split(EVENT_END)
        events.pop()  # the empty tail after the last separator
        kept = [e for e in map(self._event, events) if e is not None]
        return b"".join(e + EVENT_END for e in kept)

    def _event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data: {"):
            if event.startswith(DONE):
                self.saw_done = True
            return event
        if USAGE_MARK in event and EMPTY_CHOICES in event:
            self.usage.read(json.loads(event[6:]).get("usage"))
            if self.drop_usage:
                return None
        elif REASONING_MARK in event:
            self._tokens(1, answer=False)
            event = add_reasoning_content(event)
        elif REASONING_CONTENT_MARK in event:
            self._tokens(1, answer=False)
            event = add_reasoning(event)
        elif self._is_answer(event):
            self._tokens(1, answer=True)
        if self._rewrite is not None:
            event = event.replace(*self._rewrite)
        return event

    def _is_answer(self, event: bytes) -> bool:
        if self._completions:
            return TEXT_MARK in event and EMPTY_TEXT not in event
        return (CONTENT_MARK in event and EMPTY_CONTENT not in event) or TOOL_CALLS_MARK in event

    def _tokens(self, count: int, answer: bool) -> None:
        """`count` token events read at once: the first after the gap since the last, the rest
        arrived with it (a gap of 0)."""
        now = perf_counter()
        last = self._last_token
        if last is None:
            self._ttft.observe(now - self.start)
        else:
            self._itl.observe(now - last)
        if count > 1:
            for _ in range(count - 1):
                self._itl.observe(0.0)
        self._last_token = now
        if answer and not self._first_answer:
            self._first_answer = True
            self._ttfat.observe(now - self.start)

    def leftover(self) -> bytes:
        """An unterminated last event, forwarded as is rather than lost."""
        pending, self._pending = self._pending, b""
        return pending


def rewrite_json_response(payload: bytes, served: str, asked: str, usage: Usage) -> bytes:
    """A non-streamed response: read usage; add the reasoning's other name and the asked name when needed."""
    try:
        data = json.loads(payload)
    except ValueError:
        return payload  # not JSON: the backend's bytes, unchanged
    if not isinstance(data, dict):
        return payload
    usage.read(data.get("usage") if isinstance(data.get("usage"), dict) else None)
    changed = False
    for choice in data.get("choices") or []:
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        if message.get("reasoning") is not None and "reasoning_content" not in message:
            message["reasoning_content"] = message["reasoning"]
            changed = True
        elif message.get("reasoning_content") is not None and "reasoning" not in message:  # SGLang
            message["reasoning"] = message["reasoning_content"]
            changed = True
    if asked != served and data.get("model") == served:
        data["model"] = asked
        changed = True
    return json.dumps(data, separators=(",", ":")).encode() if changed else payload


def nested_error(payload: bytes) -> bytes:
    """A backend's error body in OpenAI's shape, `{"error": {...}}`: SGLang answers errors flat
    (`{"object": "error", "message": ...}`), which OpenAI clients do not read as an error message.
    Anything else is the backend's bytes, unchanged."""
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(data, dict) or data.get("object") != "error" or "error" in data or "message" not in data:
        return payload
    error = {key: data.get(key) for key in ("message", "type", "param", "code")}
    return json.dumps({"error": error}, separators=(",", ":")).encode()
