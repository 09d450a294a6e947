"""The multi-turn workload's shape: conversations, turns, exact lengths, the shared system prompt,
history assembly and seeds (unit tests with the tiny model's tokenizer; no server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import conversations
from benchmarks.conversation_load import turn_body
from benchmarks.conversations import SHAPES, Shape
from benchmarks.workloads import TokenCounter, WorkloadError

SMALL = Shape(conversations=3, turns=4, system_tokens=20, first_turn_tokens=50, follow_up_tokens=12, output_tokens=8)


@pytest.fixture(scope="module")
def counter(tiny_model_dir: Path) -> TokenCounter:
    from transformers import AutoTokenizer

    return TokenCounter(AutoTokenizer.from_pretrained(tiny_model_dir), "chat")


def tokens(counter: TokenCounter, text: str) -> int:
    return len(counter.tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_tokens(counter: TokenCounter, messages: list[dict[str, str]]) -> int:
    """As vLLM counts a chat request: the template applied, then tokenized."""
    text = counter.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokens(counter, text)


def test_script_has_every_turn_at_its_exact_length(counter: TokenCounter) -> None:
    script = conversations.build(counter, SMALL, seed=1)
    assert tokens(counter, script.system_prompt) == 20
    assert len(script.user_turns) == 3 and all(len(turns) == 4 for turns in script.user_turns)
    for turns in script.user_turns:
        assert [tokens(counter, t) for t in turns] == [50, 12, 12, 12]
    # Nothing is shared between conversations but the system prompt.
    assert len({turns[0] for turns in script.user_turns}) == 3
    assert script.output_tokens == 8


def test_each_turn_resends_the_history_with_the_answers(counter: TokenCounter) -> None:
    script = conversations.build(counter, SMALL, seed=1)
    answers = ["first answer", "second answer"]
    messages = script.messages(1, 2, answers)
    assert messages == [
        {"role": "system", "content": script.system_prompt},
        {"role": "user", "content": script.user_turns[1][0]}, {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": script.user_turns[1][1]}, {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": script.user_turns[1][2]},
    ]
    # Every conversation starts with the same system prompt: the prefix all of them share.
    assert {conversations.build(counter, SMALL, seed=1).messages(c, 0, [])[0]["content"] for c in range(3)} == {
        script.system_prompt}
    with pytest.raises(ValueError, match="turn 2 needs the 2 earlier answers, got 1"):
        script.messages(0, 2, ["only one"])


def test_turn_body_asks_for_exactly_the_answer_length(counter: TokenCounter) -> None:
    script = conversations.build(counter, SMALL, seed=1)
    body = turn_body(script, 0, 0, [], "tiny", True, {"temperature": 0.5})
    assert body["max_tokens"] == 8 and body["ignore_eos"] is True and body["temperature"] == 0.5
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == script.messages(0, 0, [])


def test_same_seed_same_script_other_seed_shares_nothing(counter: TokenCounter) -> None:
    one, again, other = (conversations.build(counter, SMALL, seed=s) for s in (7, 7, 8))
    assert one == again
    # A new run on a server that kept its cache must not find its prompts there: not even the
    # system prompt's first words are the same.
    assert other.system_prompt.split()[:4] != one.system_prompt.split()[:4]
    firsts = {tuple(t[0].split()[:4]) for t in one.user_turns}
    assert not firsts & {tuple(t[0].split()[:4]) for t in other.user_turns}


def test_shapes_are_history_dominated_or_system_dominated() -> None:
    history, long_system = SHAPES["history"], SHAPES["long-system"]
    assert (history.system_tokens, history.first_turn_tokens, history.follow_up_tokens) == (32, 500, 160)
    assert long_system.system_tokens > long_system.first_turn_tokens + (long_system.turns - 1) * long_system.follow_up_tokens


def test_last_turn_length_is_what_the_server_will_count(counter: TokenCounter) -> None:
    script = conversations.build(counter, SMALL, seed=3)
    answers = ["".join(counter.words()[:1]) * 8] * 3
    assert conversations.last_turn_tokens(counter, SMALL) == prompt_tokens(counter, script.messages(0, 3, answers))


def test_a_shape_beyond_the_context_is_refused_with_what_to_lower(counter: TokenCounter) -> None:
    conversations.check_fits(counter, SHAPES["history"], 2048)  # the tiny model's context fits the default
    too_long = Shape(turns=12)
    with pytest.raises(WorkloadError, match=r"more than the model's context of 2048: lower --turns") as caught:
        conversations.check_fits(counter, too_long, 2048)
    assert "11 x (follow-up 160 + answer 64)" in str(caught.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"turns": 0}, "at least one conversation of one turn"),
    ({"follow_up_tokens": 0}, "follow up tokens must be at least 1"),
])
def test_empty_shapes_are_refused(counter: TokenCounter, change: dict[str, Any], message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        conversations.build(counter, Shape(**change), seed=0)


def test_warm_up_requests_share_nothing_with_the_script(counter: TokenCounter) -> None:
    script = conversations.build(counter, SMALL, seed=5)
    bodies = conversations.warmup_bodies(counter, SMALL, 3, 5, "tiny", True, {})
    assert len(bodies) == 3
    for body in bodies:
        [message] = body["messages"]
        assert tokens(counter, message["content"]) == 50
        assert not message["content"].startswith(script.system_prompt[:40])
        assert all(not message["content"].startswith(t[0][:40]) for t in script.user_turns)
