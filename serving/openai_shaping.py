"""Shape a client request for vLLM: profile defaults, greedy policy, caps, Qwen-client fields.

An explicit client value always wins (0 included); defaults fill only what the client did not
send. Fields the stack cannot honour are refused with a 400 that says so, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deploy.profile import Sampling
from serving.errors import ApiError

NUMBER = (int, float)
# Documented OpenAI request fields that vLLM 0.32 accepts and drops without a word (not in its
# request models; tests/serving/test_shaping.py checks these lists against vLLM's and the openai
# client's own definitions). The proxy answers, and says so in x-qwen-warning.
IGNORED_BY_VLLM_CHAT = ("audio", "function_call", "functions", "metadata", "modalities", "moderation",
                        "prediction", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
                        "safety_identifier", "service_tier", "store", "verbosity", "web_search_options")
IGNORED_BY_VLLM_COMPLETIONS = ("best_of",)
OWN_RULES = frozenset({"max_tokens", "chat_template_kwargs"})  # defaults filled by rules of their own
QWEN_COMPAT_FIELDS = frozenset({"enable_search", "incremental_output", "result_format", "stop"})


@dataclass
class Shaped:
    body: dict[str, Any]
    stream: bool
    client_wants_usage: bool
    applied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    greedy_action: str | None = None
    # The max_tokens the proxy filled in from the profile (the client sent none): the one value a
    # backend's smaller max_model_len may lower (serving/exchange.py); a client's own is never changed.
    defaulted_max_tokens: int | None = None


def _is_number(value: Any) -> bool:
    return isinstance(value, NUMBER) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


KINDS: dict[str, Callable[[Any], bool]] = {
    "bool": lambda value: isinstance(value, bool),
    "number": _is_number,
    "int": _is_int,
    "object": lambda value: isinstance(value, dict),
}
# Request fields whose type the proxy relies on, checked before it reads them.
TYPED_FIELDS = (("stream", "bool"), ("temperature", "number"), ("max_tokens", "int"),
                ("max_completion_tokens", "int"), ("chat_template_kwargs", "object"),
                ("stream_options", "object"), ("enable_thinking", "bool"))


def _expect(body: dict[str, Any], name: str, kind: str) -> None:
    value = body.get(name)
    if value is not None and not KINDS[kind](value):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ApiError(400, f"'{name}' must be {article} {kind}, got {type(value).__name__}", param=name)


def _qwen_compat(body: dict[str, Any]) -> None:
    """Fields Qwen-hosting APIs accept: honour what we can, refuse what we cannot."""
    if body.get("enable_search"):
        raise ApiError(400, "'enable_search' is not supported: this deployment has no web search",
                       param="enable_search")
    if body.get("incremental_output") is False:
        raise ApiError(400, "'incremental_output': false is not supported: streams carry deltas only",
                       param="incremental_output")
    if body.get("result_format") not in (None, "message"):
        raise ApiError(400, "'result_format' must be 'message' (OpenAI chat format) if given",
                       param="result_format")
    for honoured_by_default in ("enable_search", "incremental_output", "result_format"):
        body.pop(honoured_by_default, None)

    stop = body.get("stop")
    if isinstance(stop, list) and stop and all(isinstance(s, (int, list)) and not isinstance(s, bool) for s in stop):
        ids: list[int] = []
        for item in stop:
            if isinstance(item, int):
                ids.append(item)
            elif len(item) == 1 and _is_int(item[0]):
                ids.append(item[0])
            else:
                raise ApiError(400, "'stop' as token ids: each entry must be one token id; send "
                               "multi-token stop sequences as strings", param="stop")
        body.pop("stop")
        existing = body.get("stop_token_ids") or []
        if not isinstance(existing, list):
            raise ApiError(400, "'stop_token_ids' must be a list of token ids", param="stop_token_ids")
        body["stop_token_ids"] = [*existing, *ids]


def _history_reasoning_for_sglang(body: dict[str, Any]) -> None:
    """SGLang reads an assistant turn's reasoning only as `reasoning_content` and drops `reasoning`
    (vLLM 0.32 the other way round, and it renames `reasoning_content` itself): a client that
    sends back what vLLM-style APIs returned gets its reasoning to SGLang's prompt too."""
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if (isinstance(message, dict) and message.get("role") == "assistant"
                and isinstance(message.get("reasoning"), str) and message.get("reasoning_content") is None):
            message["reasoning_content"] = message.pop("reasoning")


def _ignored_fields(body: dict[str, Any], chat: bool) -> list[str]:
    names = IGNORED_BY_VLLM_CHAT if chat else IGNORED_BY_VLLM_COMPLETIONS
    if body.keys().isdisjoint(names):  # the usual request: one pass in C, not a lookup per name
        return []
    return [f"'{name}' is ignored by this deployment (vLLM does not implement it)"
            for name in names if body.get(name) is not None]


def shape(body: dict[str, Any], sampling: Sampling, chat: bool, engine: str = "vllm") -> Shaped:
    for name, kind in TYPED_FIELDS:
        _expect(body, name, kind)
    if not body.keys().isdisjoint(QWEN_COMPAT_FIELDS):
        _qwen_compat(body)
    applied: list[str] = []
    # The lists are vLLM's (held to its request models by a test); SGLang's differ, so no claim there.
    warnings: list[str] = _ignored_fields(body, chat) if engine == "vllm" else []
    if chat and engine == "sglang":
        _history_reasoning_for_sglang(body)

    if chat and "enable_thinking" in body:
        thinking = body.pop("enable_thinking")
        kwargs = dict(body.get("chat_template_kwargs") or {})
        kwargs.setdefault("enable_thinking", thinking)
        body["chat_template_kwargs"] = kwargs

    defaults = sampling.defaults.filled
    for name, value in defaults.items():
        if name not in OWN_RULES and body.get(name) is None:
            body[name] = value
            applied.append(name)
    max_tokens = defaults.get("max_tokens")
    template_defaults = defaults.get("chat_template_kwargs")
    if max_tokens is not None and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = max_tokens
        applied.append("max_tokens")
    if chat and template_defaults:
        client_kwargs = body.get("chat_template_kwargs") or {}
        missing = {k: v for k, v in template_defaults.items() if k not in client_kwargs}
        if missing:
            body["chat_template_kwargs"] = {**missing, **client_kwargs}
            applied.append("chat_template_kwargs")

    cap = sampling.max_tokens_cap
    if cap is not None:
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int) and body[name] > cap:
                warnings.append(f"{name} {body[name]} capped to {cap}")
                body[name] = cap

    greedy_action = None
    if body.get("temperature") == 0:
        policy = sampling.greedy
        if policy == "reject":
            raise ApiError(400, "temperature 0 (greedy decoding) is refused for this model: it makes Qwen "
                           "reasoning models repeat endlessly; use the default (omit temperature) or "
                           "temperature >= 0.1", param="temperature", code="greedy_decoding_refused")
        greedy_action = "allowed" if policy == "allow" else "warned"
        if policy == "warn":
            warnings.append("temperature 0 (greedy decoding) can make Qwen models repeat endlessly")

    stream = bool(body.get("stream"))
    client_wants_usage = False
    if stream:
        options = dict(body.get("stream_options") or {})
        client_wants_usage = options.get("include_usage") is True
        options["include_usage"] = True  # the proxy counts tokens from the backend's usage
        body["stream_options"] = options
    defaulted = body["max_tokens"] if max_tokens is not None and "max_tokens" in applied else None
    return Shaped(body, stream, client_wants_usage, applied, warnings, greedy_action, defaulted)
