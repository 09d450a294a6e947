"""The streaming relay: events through untouched unless they must change."""

from __future__ import annotations

import functools
import json

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from serving.metrics import Metrics
from serving.openai_stream import (
    StreamRelay,
    Usage,
    add_reasoning_content,
    nested_error,
    rewrite_json_response,
)

CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}],"model":"m"}\n\n'
ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"model":"m"}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
DONE = b"data: [DONE]\n\n"


def relay(drop_usage: bool = True, rewrite: tuple[bytes, bytes] | None = None) -> tuple[StreamRelay, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return StreamRelay(metrics, "m", 0.0, drop_usage=drop_usage, rewrite=rewrite, completions=False), metrics


def test_events_pass_through_byte_for_byte() -> None:
    r, _ = relay()
    assert r.feed(ROLE) == ROLE
    assert r.feed(CONTENT) == CONTENT
    assert r.feed(DONE) == DONE and r.saw_done


def test_split_and_merged_reads() -> None:
    r, _ = relay()
    stream = ROLE + CONTENT + CONTENT + DONE
    out = b"".join(r.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))
    assert out == stream


def test_usage_event_dropped_unless_asked_and_counted_either_way() -> None:
    r, _ = relay(drop_usage=True)
    assert r.feed(CONTENT + USAGE + DONE) == CONTENT + DONE
    assert (r.usage.prompt, r.usage.completion) == (3, 2)
    kept, _ = relay(drop_usage=False)
    assert kept.feed(USAGE) == USAGE


def test_token_timing_ignores_role_and_usage_events() -> None:
    r, metrics = relay()
    r.feed(ROLE + CONTENT + CONTENT + USAGE)
    ttft = metrics.registry.get_sample_value("qwen_proxy_time_to_first_token_seconds_count", {"model": "m"})
    itl = metrics.registry.get_sample_value("qwen_proxy_inter_token_latency_seconds_count", {"model": "m"})
    assert (ttft, itl) == (1.0, 1.0)


def test_reasoning_content_is_added_beside_reasoning() -> None:
    event = b'data: {"choices":[{"delta":{"reasoning":"a \\"q\\" \\u00e9"},"finish_reason":null}]}\n\n'
    r, metrics = relay()
    out = r.feed(event)
    delta = json.loads(out[6:])["choices"][0]["delta"]
    assert delta["reasoning"] == delta["reasoning_content"] == 'a "q" \u00e9'
    answer = metrics.registry.get_sample_value("qwen_proxy_time_to_first_answer_token_seconds_count", {"model": "m"})
    assert answer == 0.0  # reasoning is not an answer token


@given(st.text())
def test_reasoning_content_copy_is_exact_for_any_text(text: str) -> None:
    event = ("data: " + json.dumps({"delta": {"reasoning": text}, "n": 1}, separators=(",", ":"))).encode()
    delta = json.loads(add_reasoning_content(event)[6:])["delta"]
    assert delta == {"reasoning": text, "reasoning_content": text}


def test_alias_rewrite() -> None:
    r, _ = relay(rewrite=(b'"model":"m"', b'"model":"alias"'))
    assert json.loads(r.feed(CONTENT)[6:])["model"] == "alias"


def test_non_streamed_response() -> None:
    payload = json.dumps({"model": "m", "choices": [{"message": {"content": "x", "reasoning": "r"}}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    usage = Usage()
    data = json.loads(rewrite_json_response(payload, "m", "alias", usage))
    assert data["model"] == "alias" and data["choices"][0]["message"]["reasoning_content"] == "r"
    assert usage.completion == 2
    assert rewrite_json_response(b"not json", "m", "alias", Usage()) == b"not json"
    untouched = json.dumps({"model": "m", "choices": [{"message": {"content": "x", "reasoning": None}}]}).encode()
    assert rewrite_json_response(untouched, "m", "m", Usage()) is untouched


REASONING = b'data: {"choices":[{"index":0,"delta":{"reasoning":"hm"},"finish_reason":null}],"model":"m"}\n\n'
TOOL = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}],"model":"m"}\n\n'
PING = b": keep-alive\n\n"
WITH_CONTENT = REASONING.replace(b'{"reasoning":"hm"}', b'{"reasoning":"hm","reasoning_content":"hm"}')
TOKENS = {ROLE: 0, CONTENT: 1, REASONING: 1, TOOL: 1, PING: 0}


def counts(metrics: Metrics) -> tuple[float | None, ...]:
    names = ("time_to_first_token", "inter_token_latency", "time_to_first_answer_token")
    return tuple(metrics.registry.get_sample_value(f"qwen_proxy_{name}_seconds_count", {"model": "m"})
                 for name in names)


@given(st.lists(st.sampled_from(list(TOKENS)), min_size=1, max_size=12), st.integers(1, 400))
def test_any_reads_of_any_events_give_the_same_bytes_and_token_counts(events: list[bytes], size: int) -> None:
    """However the stream is cut into reads (one event per read, several, or partial ones), what
    reaches the client and what is counted are the same."""
    r, metrics = relay(drop_usage=True, rewrite=(b'"model":"m"', b'"model":"alias"'))
    stream = b"".join(events) + USAGE + DONE
    out = b"".join(r.feed(stream[i:i + size]) for i in range(0, len(stream), size))
    expected = b"".join(events).replace(REASONING, WITH_CONTENT).replace(b'"model":"m"', b'"model":"alias"') + DONE
    assert out == expected and r.saw_done and r.usage.completion == 2
    tokens = sum(TOKENS[e] for e in events)
    answered = any(e in (CONTENT, TOOL) for e in events)
    assert counts(metrics) == (float(tokens > 0), float(max(tokens - 1, 0)), float(answered))


def test_several_events_in_one_read_are_timed_one_by_one() -> None:
    r, metrics = relay()
    assert r.feed(ROLE + REASONING + REASONING + CONTENT) == ROLE + WITH_CONTENT + WITH_CONTENT + CONTENT
    assert counts(metrics) == (1.0, 2.0, 1.0)
    completions = StreamRelay(metrics, "c", 0.0, drop_usage=True, rewrite=None, completions=True)
    text = b'data: {"choices":[{"index":0,"text":"a"}]}\n\n'
    completions.feed(text + text.replace(b'"a"', b'""') + text)
    itl = metrics.registry.get_sample_value("qwen_proxy_inter_token_latency_seconds_count", {"model": "c"})
    assert itl == 1.0  # two text tokens; the empty one is not a token


@functools.cache
def vllm_stream() -> bytes:
    """A chat stream rendered by the pinned vLLM's own response classes, as its server writes them."""
    from vllm.entrypoints.generate.base.protocol import DeltaMessage
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponseStreamChoice,
        ChatCompletionStreamResponse,
    )
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    def chunk(delta: DeltaMessage, finish: str | None = None) -> bytes:
        choice = ChatCompletionResponseStreamChoice(index=0, delta=delta, logprobs=None, finish_reason=finish)
        response = ChatCompletionStreamResponse(id="chatcmpl-1", created=1, model="m", choices=[choice])
        return b"data: " + response.model_dump_json(exclude_unset=True).encode() + b"\n\n"

    usage = ChatCompletionStreamResponse(id="chatcmpl-1", created=1, model="m", choices=[],
                                         usage=UsageInfo(prompt_tokens=3, completion_tokens=3, total_tokens=6),
                                         system_fingerprint=None)
    return (chunk(DeltaMessage(role="assistant", content="")) + chunk(DeltaMessage(reasoning="r"))
            + chunk(DeltaMessage(content=" a")) + chunk(DeltaMessage(content=" b"), finish="length")
            + b"data: " + usage.model_dump_json(exclude_unset=True, exclude_none=True).encode() + b"\n\n" + DONE)


@given(st.integers(1, 900))
def test_vllms_own_events_in_any_reads(size: int) -> None:
    """Reads that end with one of vLLM's chunks skip the search for the end of the stream: its usage
    event and [DONE] are still found, however the stream is cut."""
    stream = vllm_stream()
    assert stream.count(b"}]}\n\n") == 4  # the chunks end with their choices, the usage event does not
    r, metrics = relay(drop_usage=True)
    out = b"".join(r.feed(stream[i:i + size]) for i in range(0, len(stream), size)) + r.leftover()
    assert b'"usage"' not in out and out.endswith(DONE) and r.saw_done
    assert (r.usage.prompt, r.usage.completion) == (3, 3)
    assert counts(metrics) == (1.0, 2.0, 1.0)  # three tokens: the reasoning one first, then two answers


def test_a_usage_event_with_its_choices_last_still_ends_the_stream() -> None:
    """An engine may write the usage event's (empty) choices after its usage: the read still ends
    the stream, though it ends with `]}`."""
    usage_last_choices = b'data: {"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"choices":[]}\n\n'
    r, _ = relay(drop_usage=True)
    assert r.feed(CONTENT) == CONTENT
    assert r.feed(usage_last_choices) == b""
    assert (r.usage.prompt, r.usage.completion) == (3, 2)


SGLANG_REASONING = (b'data: {"choices":[{"index":0,"delta":{"role":null,"content":null,"reasoning_content":"a \\"b\\""},'
                    b'"finish_reason":null,"matched_stop":null}],"usage":null}\n\n')
SGLANG_CONTENT = (b'data: {"choices":[{"index":0,"delta":{"role":null,"content":" hi","reasoning_content":null},'
                  b'"finish_reason":null,"matched_stop":null}],"usage":null}\n\n')


def test_sglangs_reasoning_content_also_comes_as_reasoning() -> None:
    for reads in ([SGLANG_REASONING + SGLANG_CONTENT], [SGLANG_REASONING, SGLANG_CONTENT]):
        r, metrics = relay()
        out = b"".join(r.feed(read) for read in reads)
        first, second = (json.loads(event[6:])["choices"][0]["delta"] for event in out.split(b"\n\n")[:2])
        assert first["reasoning"] == first["reasoning_content"] == 'a "b"' and "reasoning" not in second
        assert second["content"] == " hi"  # `"usage":null` on every chunk is not the usage event
        assert counts(metrics) == (1.0, 1.0, 1.0)  # a reasoning token, then the first answer token


def test_sglangs_whole_answer_and_usage() -> None:
    payload = json.dumps({"model": "m", "choices": [{"message": {"content": "x", "reasoning_content": "r"}}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 5, "reasoning_tokens": 3,
                                    "completion_tokens_details": None}}).encode()
    usage = Usage()
    message = json.loads(rewrite_json_response(payload, "m", "m", usage))["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "r" and usage.reasoning == 3


def test_flat_errors_are_nested_as_openais() -> None:
    flat = json.dumps({"object": "error", "message": "bad", "type": "Bad Request", "param": None, "code": 400})
    assert json.loads(nested_error(flat.encode())) == {
        "error": {"message": "bad", "type": "Bad Request", "param": None, "code": 400}}
    nested = b'{"error": {"message": "bad"}}'
    assert nested_error(nested) is nested and nested_error(b"Internal Server Error") == b"Internal Server Error"
