"""The multi-turn workload: N conversations of T turns behind one shared system prompt.

Pure and seeded: the script (system prompt, every user turn) is fixed by the seed; the
assistant turns are the server's real answers, filled in while the load runs
(benchmarks/conversation_load.py). Each turn re-sends the whole history, as chat clients do, so
a server that kept the conversation's earlier turns in its prefix cache skips their prefill.

Lengths are content tokens: every word is one token of the model's tokenizer (with its leading
space), so a turn of N words is N tokens before the chat template's few tokens per message.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.workloads import TokenCounter, WorkloadError


@dataclass(frozen=True)
class Shape:
    """Sizes of one multi-turn workload, in tokens."""

    conversations: int = 16
    turns: int = 5
    system_tokens: int = 32
    first_turn_tokens: int = 500
    follow_up_tokens: int = 160
    output_tokens: int = 64

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# history: most of each prompt is the conversation's own earlier turns, unique to it;
# long-system: most of it is the system prompt every conversation shares.
SHAPES = {
    "history": Shape(system_tokens=32, first_turn_tokens=500, follow_up_tokens=160),
    "long-system": Shape(system_tokens=1024, first_turn_tokens=128, follow_up_tokens=64),
}


@dataclass(frozen=True)
class Script:
    """What the client says: one system prompt, and each conversation's user turns."""

    system_prompt: str
    user_turns: list[list[str]]      # [conversation][turn]
    output_tokens: int

    def messages(self, conversation: int, turn: int, answers: list[str]) -> list[dict[str, str]]:
        """The request of `turn`: the system prompt, the earlier turns with their answers, then
        this turn's user message."""
        if len(answers) != turn:
            raise ValueError(f"turn {turn} needs the {turn} earlier answers, got {len(answers)}")
        messages = [{"role": "system", "content": self.system_prompt}]
        for user, answer in zip(self.user_turns[conversation][:turn], answers, strict=True):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": self.user_turns[conversation][turn]})
        return messages


def _text(words: list[str], count: int, rng: random.Random) -> str:
    return "".join(rng.choice(words) for _ in range(count))


def build(counter: TokenCounter, shape: Shape, seed: int) -> Script:
    """The script for `seed`: another seed gives another system prompt and other turns (nothing a
    server cached from an earlier run is reused)."""
    if shape.conversations < 1 or shape.turns < 1:
        raise WorkloadError("multi-turn needs at least one conversation of one turn")
    for name in ("system_tokens", "first_turn_tokens", "follow_up_tokens", "output_tokens"):
        if getattr(shape, name) < 1:
            raise WorkloadError(f"multi-turn {name.replace('_', ' ')} must be at least 1")
    words = counter.words()
    rng = random.Random(f"multi-turn:{seed}")
    system = _text(words, shape.system_tokens, rng)
    turns = [[_text(words, shape.first_turn_tokens if t == 0 else shape.follow_up_tokens, rng)
              for t in range(shape.turns)] for _ in range(shape.conversations)]
    return Script(system, turns, shape.output_tokens)


def last_turn_tokens(counter: TokenCounter, shape: Shape) -> int:
    """Prompt tokens of a conversation's last turn, chat template included, when every answer
    is `output_tokens` tokens (real answers re-tokenize to about that)."""
    word = counter.words()[0]
    answers = [word * shape.output_tokens] * (shape.turns - 1)
    script = Script(word * shape.system_tokens,
                    [[word * (shape.first_turn_tokens if t == 0 else shape.follow_up_tokens)
                      for t in range(shape.turns)]], shape.output_tokens)
    text = counter.tokenizer.apply_chat_template(script.messages(0, shape.turns - 1, answers),
                                                 add_generation_prompt=True, tokenize=False)
    # verbose=False: a shape too long for the model is refused below, not warned about by transformers.
    return len(counter.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def check_fits(counter: TokenCounter, shape: Shape, max_model_len: int | None) -> None:
    """Refuse a shape whose last turn plus its answer would not fit the model's context."""
    if max_model_len is None:
        return
    needed = last_turn_tokens(counter, shape) + shape.output_tokens
    if needed > max_model_len:
        raise WorkloadError(
            f"multi-turn: the last turn needs ~{needed} tokens (system {shape.system_tokens} + first turn "
            f"{shape.first_turn_tokens} + {shape.turns - 1} x (follow-up {shape.follow_up_tokens} + answer "
            f"{shape.output_tokens}) + answer + chat template), more than the model's context of "
            f"{max_model_len}: lower --turns, --first-turn-len, --follow-up-len, --system-len or --output-len")


def warmup_bodies(counter: TokenCounter, shape: Shape, count: int, seed: int, model: str,
                  stream: bool, sampling: dict[str, Any]) -> list[dict[str, Any]]:
    """Single-turn requests of a first turn's length that share nothing with the script."""
    rng = random.Random(f"multi-turn-warmup:{seed}")
    bodies = []
    for _ in range(count):
        body: dict[str, Any] = {
            "model": model, "stream": stream,
            "messages": [{"role": "user", "content": _text(counter.words(), shape.first_turn_tokens, rng)}],
            "max_tokens": shape.output_tokens, "ignore_eos": True}
        if stream:
            body["stream_options"] = {"include_usage": True}
        bodies.append(body | sampling)
    return bodies
