"""Request shaping: defaults fill only what the client left out; refusals say why."""

from __future__ import annotations

from typing import Any

import pytest

from deploy.profile import Sampling, SamplingDefaults
from serving.errors import ApiError
from serving.openai_shaping import shape

QWQ = Sampling(
    defaults=SamplingDefaults(temperature=0.6, top_p=0.95, top_k=40, min_p=0.0, max_tokens=32768,
                              presence_penalty=0.5, chat_template_kwargs={"enable_thinking": True, "style": "x"}),
    max_tokens_cap=40000, greedy="reject",
)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_defaults_fill_missing_fields_only() -> None:
    shaped = shape(chat(top_p=0.5), QWQ, chat=True)
    assert shaped.body["temperature"] == 0.6 and shaped.body["top_p"] == 0.5
    assert shaped.body["top_k"] == 40 and shaped.body["presence_penalty"] == 0.5
    assert shaped.body["max_tokens"] == 32768
    assert "top_p" not in shaped.applied and {"temperature", "top_k", "max_tokens"} <= set(shaped.applied)


def test_explicit_zero_wins() -> None:
    shaped = shape(chat(top_k=0, min_p=0, presence_penalty=0), QWQ, chat=True)
    assert (shaped.body["top_k"], shaped.body["presence_penalty"]) == (0, 0)


def test_max_completion_tokens_counts_as_sent() -> None:
    shaped = shape(chat(max_completion_tokens=10), QWQ, chat=True)
    assert "max_tokens" not in shaped.body


def test_chat_template_kwargs_merge_key_by_key() -> None:
    shaped = shape(chat(chat_template_kwargs={"enable_thinking": False}), QWQ, chat=True)
    assert shaped.body["chat_template_kwargs"] == {"enable_thinking": False, "style": "x"}


def test_enable_thinking_maps_to_template_kwargs() -> None:
    shaped = shape(chat(enable_thinking=False), QWQ, chat=True)
    assert "enable_thinking" not in shaped.body
    assert shaped.body["chat_template_kwargs"]["enable_thinking"] is False


def test_cap() -> None:
    shaped = shape(chat(max_tokens=100000), QWQ, chat=True)
    assert shaped.body["max_tokens"] == 40000 and "capped to 40000" in shaped.warnings[0]


@pytest.mark.parametrize(("policy", "action"), [("allow", "allowed"), ("warn", "warned")])
def test_greedy_allow_and_warn(policy: str, action: str) -> None:
    shaped = shape(chat(temperature=0), Sampling(greedy=policy), chat=True)  # type: ignore[arg-type]
    assert shaped.greedy_action == action and shaped.body["temperature"] == 0
    assert bool(shaped.warnings) == (policy == "warn")


def test_greedy_reject() -> None:
    with pytest.raises(ApiError) as err:
        shape(chat(temperature=0), QWQ, chat=True)
    assert err.value.status == 400 and err.value.param == "temperature"
    assert "repeat endlessly" in err.value.message


def test_stop_token_ids() -> None:
    shaped = shape(chat(stop=[[7], 9]), QWQ, chat=True)
    assert "stop" not in shaped.body and shaped.body["stop_token_ids"] == [7, 9]
    assert shape(chat(stop=["a"]), QWQ, chat=True).body["stop"] == ["a"]
    with pytest.raises(ApiError, match="send multi-token stop sequences as strings"):
        shape(chat(stop=[[7, 8]]), QWQ, chat=True)


def test_unhonourable_fields_are_refused() -> None:
    with pytest.raises(ApiError, match="'enable_search' is not supported"):
        shape(chat(enable_search=True), QWQ, chat=True)
    with pytest.raises(ApiError, match="incremental_output"):
        shape(chat(incremental_output=False), QWQ, chat=True)
    body = shape(chat(enable_search=False, incremental_output=True, result_format="message"), QWQ, chat=True).body
    assert not {"enable_search", "incremental_output", "result_format"} & set(body)


@pytest.mark.parametrize(("field", "value"), [("temperature", "hot"), ("max_tokens", 1.5), ("stream", "yes"),
                                              ("chat_template_kwargs", [1]), ("max_tokens", True)])
def test_wrong_types_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ApiError) as err:
        shape(chat(**{field: value}), QWQ, chat=True)
    assert err.value.status == 400 and err.value.param == field and field in err.value.message


def test_stream_always_asks_backend_for_usage() -> None:
    shaped = shape(chat(stream=True), QWQ, chat=True)
    assert shaped.body["stream_options"] == {"include_usage": True} and not shaped.client_wants_usage
    shaped = shape(chat(stream=True, stream_options={"include_usage": True}), QWQ, chat=True)
    assert shaped.client_wants_usage


# ---- fields vLLM ignores ----------------------------------------------

@pytest.mark.parametrize(("is_chat", "field"), [(True, "prediction"), (True, "store"), (True, "functions"),
                                                 (False, "best_of")])
def test_fields_vllm_ignores_are_answered_with_a_warning(is_chat: bool, field: str) -> None:
    body = chat(**{field: {"type": "content", "content": "x"}}) if is_chat else {"model": "m", "prompt": "p",
                                                                                 field: 3}
    shaped = shape(body, QWQ, chat=is_chat)
    assert f"'{field}' is ignored by this deployment (vLLM does not implement it)" in shaped.warnings
    assert field in shaped.body  # passed on: vLLM accepts it, the warning says it had no effect


@pytest.mark.vllm
def test_ignored_field_lists_match_vllm_and_the_openai_client() -> None:
    """The documented request fields (the official openai client's) that vLLM's request models do
    not define, and so drop: a vLLM or client upgrade that changes them fails here."""
    import typing

    from openai.types import completion_create_params as completion_params
    from openai.types.chat import completion_create_params as chat_params
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from serving.openai_shaping import IGNORED_BY_VLLM_CHAT, IGNORED_BY_VLLM_COMPLETIONS

    documented_chat = set(typing.get_type_hints(chat_params.CompletionCreateParamsBase))
    documented_completions = set(typing.get_type_hints(completion_params.CompletionCreateParamsBase))
    assert sorted(documented_chat - set(ChatCompletionRequest.model_fields)) == sorted(IGNORED_BY_VLLM_CHAT)
    assert sorted(documented_completions - set(CompletionRequest.model_fields)) == \
        sorted(IGNORED_BY_VLLM_COMPLETIONS)
