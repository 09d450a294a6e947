"""Benchmark workloads, generated offline and reproducibly from a seed (no dataset downloads).

Synthetic prompts are built from words that are one token each in the model's own tokenizer,
then checked against the tokenizer with the chat template applied (or the raw prompt for the
completions API), so the server's `usage.prompt_tokens` equals the requested input length.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

WORKLOADS = ("synthetic", "shared-prefix", "long-context", "reasoning", "jsonl", "multi-turn")
Api = Literal["chat", "completions"]

# The vendor's prompt convention for math benchmarks (QwQ-32B and Qwen3 thinking models).
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class WorkloadError(ValueError):
    """A workload that cannot be built as asked (the message says what to change)."""


@dataclass(frozen=True)
class Lengths:
    """A length distribution: fixed, uniform in mean*(1 +- spread), or normal (sd = mean*spread)."""

    mean: int
    dist: Literal["fixed", "uniform", "normal"] = "fixed"
    spread: float = 0.0

    def sample(self, rng: random.Random) -> int:
        if self.dist == "fixed" or self.spread == 0:
            return self.mean
        if self.dist == "uniform":
            low, high = self.mean * (1 - self.spread), self.mean * (1 + self.spread)
            return max(1, round(rng.uniform(low, high)))
        return max(1, round(rng.gauss(self.mean, self.mean * self.spread)))


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: the body fields that carry its content and length."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None      # None: natural length (the model's/proxy's default cap)
    ignore_eos: bool = False
    input_tokens: int | None = None    # as counted with the model's tokenizer

    def body(self, model: str, api: Api, stream: bool, sampling: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "stream": stream}
        if api == "chat":
            body["messages"] = self.messages or [{"role": "user", "content": self.prompt or ""}]
        else:
            body["prompt"] = self.prompt if self.prompt is not None else _flatten(self.messages or [])
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension: exactly max_tokens tokens
        body.update(sampling)
        return body


def _flatten(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


@dataclass
class TokenCounter:
    """Token counts exactly as the server computes them for a request."""

    tokenizer: Any
    api: Api
    _words: list[str] = field(default_factory=list)

    def count(self, text: str) -> int:
        if self.api == "chat":
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return len(self.tokenizer(text)["input_ids"])

    def words(self) -> list[str]:
        """Vocabulary words that encode to exactly one token with their leading space."""
        if not self._words:
            candidates = sorted(w for w in self.tokenizer.get_vocab() if w.startswith("Ġ")
                                and w[1:].isascii() and w[1:].isalpha())
            for piece in candidates:
                word = " " + piece[1:]
                if len(self.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
                    self._words.append(word)
            if len(self._words) < 20:
                raise WorkloadError("the tokenizer has too few single-token words to build synthetic "
                                    "prompts; use --workload jsonl with your own prompts")
        return self._words

    def text_of_length(self, total: int, rng: random.Random, prefix: str = "") -> str:
        """A prompt (prefix + random words) whose request is exactly `total` tokens."""
        words = self.words()
        overhead = self.count(prefix)
        if total <= overhead:
            raise WorkloadError(f"an input of {total} tokens is shorter than the fixed part of the "
                                f"prompt ({overhead} tokens with the chat template); ask for more")
        chosen = [rng.choice(words) for _ in range(total - overhead)]
        for _ in range(20):
            text = prefix + "".join(chosen)
            got = self.count(text)
            if got == total:
                return text
            if got > total:
                del chosen[max(1, len(chosen) - (got - total)):]
            else:
                chosen += [rng.choice(words) for _ in range(total - got)]
        raise WorkloadError(f"could not build a prompt of exactly {total} tokens with this tokenizer")


def synthetic(counter: TokenCounter, n: int, rng: random.Random, inputs: Lengths,
              outputs: Lengths | None) -> Iterator[RequestSpec]:
    for _ in range(n):
        length = inputs.sample(rng)
        yield _spec(counter, counter.text_of_length(length, rng), length, outputs, rng)


def shared_prefix(counter: TokenCounter, n: int, rng: random.Random, prefix_tokens: int,
                  inputs: Lengths, outputs: Lengths | None) -> Iterator[RequestSpec]:
    """Requests that share one long prefix (a system prompt, a document): prefix caching."""
    if prefix_tokens <= 0:
        raise WorkloadError("--prefix-len must be positive for the shared-prefix workload")
    prefix = "".join(rng.choice(counter.words()) for _ in range(prefix_tokens))
    for _ in range(n):
        length = prefix_tokens + inputs.sample(rng)
        yield _spec(counter, counter.text_of_length(length, rng, prefix=prefix), length, outputs, rng)


def reasoning(rng: random.Random, n: int, outputs: Lengths | None) -> Iterator[RequestSpec]:
    """Arithmetic and algebra word problems in the vendor's math format; natural output length."""
    templates = [
        "What is {a} * {b} + {c}?",
        "A train travels {a} km in {b} hours and then {c} km in {d} hours. What is its average speed?",
        "Find the remainder when {a}^{b} is divided by {c}.",
        "How many positive integers less than {a}{b} are divisible by {c} but not by {d}?",
        "Solve for x: {a}x + {b} = {c}x - {d}.",
        "The sum of {d} consecutive integers is {a}{c}. What is the largest of them?",
    ]
    for _ in range(n):
        numbers = {k: rng.randint(2, 97) for k in "abcd"}
        question = rng.choice(templates).format(**numbers)
        yield RequestSpec(messages=[{"role": "user", "content": f"{question}\n{MATH_INSTRUCTION}"}],
                          max_tokens=outputs.sample(rng) if outputs else None)


def jsonl(path: Path, n: int, rng: random.Random, outputs: Lengths | None,
          counter: TokenCounter | None) -> list[RequestSpec]:
    """User prompts from a JSONL file: ShareGPT (`conversations` with from/value), OpenAI
    (`messages` with role/content) or `{"prompt": ...}`; each line is one request, up to the last
    user turn. Without --output-len, a ShareGPT reply's token count sets max_tokens (as vLLM's
    own ShareGPT benchmark); otherwise the length is natural."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"cannot read --dataset {path}: {exc.strerror}") from None
    specs: list[RequestSpec] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            messages, reply = _conversation(item)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise WorkloadError(f"{path}:{number}: not a prompt, messages or ShareGPT conversation "
                                f"line ({type(exc).__name__}: {exc})") from None
        if not messages:
            continue
        max_tokens = outputs.sample(rng) if outputs else None
        if max_tokens is None and reply and counter is not None:
            max_tokens = max(1, len(counter.tokenizer(reply, add_special_tokens=False)["input_ids"]))
        specs.append(RequestSpec(messages=messages, max_tokens=max_tokens, ignore_eos=outputs is not None))
    if not specs:
        raise WorkloadError(f"{path}: no prompts found")
    rng.shuffle(specs)
    return [specs[i % len(specs)] for i in range(n)]


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system", "chatgpt": "assistant"}


def _conversation(item: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    if "prompt" in item:
        return [{"role": "user", "content": str(item["prompt"])}], None
    if "messages" in item:
        turns = [{"role": m["role"], "content": str(m["content"])} for m in item["messages"]]
    else:
        turns = [{"role": _ROLES[t["from"].lower()], "content": str(t["value"])}
                 for t in item["conversations"]]
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
    reply = turns[last_user + 1]["content"] if last_user + 1 < len(turns) else None
    return turns[: last_user + 1], reply


def _spec(counter: TokenCounter, text: str, length: int, outputs: Lengths | None,
          rng: random.Random) -> RequestSpec:
    max_tokens = outputs.sample(rng) if outputs else None
    if counter.api == "chat":
        return RequestSpec(messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                           ignore_eos=outputs is not None, input_tokens=length)
    return RequestSpec(prompt=text, max_tokens=max_tokens, ignore_eos=outputs is not None,
                       input_tokens=length)
