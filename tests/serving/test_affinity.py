"""Prefix affinity's pure parts: what keys a request, and the consistent-hash ring."""

from __future__ import annotations

from dataclasses import dataclass

from serving.affinity import Ring, capacity, request_key


@dataclass(eq=False)
class Node:
    url: str


def chat(*messages: tuple[str, str], **extra: object) -> dict[str, object]:
    return {"messages": [{"role": role, "content": content} for role, content in messages], **extra}


def test_every_turn_of_a_conversation_has_the_first_turns_key() -> None:
    first = chat(("system", "S"), ("user", "hello"))
    later = chat(("system", "S"), ("user", "hello"), ("assistant", "hi"), ("user", "and then?"))
    assert request_key(first, True, None) == request_key(later, True, None)
    assert request_key(chat(("system", "S"), ("user", "other")), True, None) != request_key(first, True, None)
    assert request_key(chat(("system", "T"), ("user", "hello")), True, None) != request_key(first, True, None)


def test_content_parts_key_like_their_text() -> None:
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    assert request_key(parts, True, None) == request_key(chat(("user", "hello")), True, None)


def test_a_session_or_user_wins_over_the_prompt() -> None:
    a, b = chat(("user", "one")), chat(("user", "two"))
    assert request_key(a, True, b"s1") == request_key(b, True, b"s1") != request_key(a, True, b"s2")
    assert request_key({**a, "user": "u"}, True, None) == request_key({**b, "user": "u"}, True, None)


def test_completions_key_on_the_leading_text() -> None:
    assert request_key({"prompt": "abc"}, False, None) == request_key({"prompt": ["abc", "x"]}, False, None)
    assert request_key({"prompt": [1, 2, 3]}, False, None) != request_key({"prompt": [1, 2, 4]}, False, None)
    assert request_key({"prompt": ""}, False, None) is None
    assert request_key({"messages": "not a list"}, True, None) is None


def test_a_long_prompt_is_keyed_on_its_start() -> None:
    long = "x" * 100_000
    assert request_key({"prompt": long + "a"}, False, None) == request_key({"prompt": long + "b"}, False, None)


def test_the_ring_visits_every_backend_once_from_the_keys_owner() -> None:
    nodes = [Node(f"http://10.0.0.{i}:8000") for i in range(5)]
    ring = Ring(nodes)
    for key in (0, 1 << 32, 2**64 - 1, 12345678901234):
        order = list(ring.walk(key))
        assert sorted(n.url for n in order) == sorted(n.url for n in nodes)
    assert list(Ring([]).walk(5)) == []


def test_removing_a_backend_moves_only_its_own_keys() -> None:
    nodes = [Node(f"http://10.0.0.{i}:8000") for i in range(4)]
    keys = [request_key({"prompt": f"conversation {i}"}, False, None) for i in range(400)]
    before = {key: next(Ring(nodes).walk(key)).url for key in keys if key is not None}
    smaller = Ring(nodes[:3])
    after = {key: next(smaller.walk(key)).url for key in before}
    moved = [key for key in before if before[key] != after[key]]
    assert moved and all(before[key] == nodes[3].url for key in moved)
    shares = [sum(1 for url in before.values() if url == n.url) for n in nodes]
    assert min(shares) > 50  # 400 keys over 4 backends: nobody starved (virtual nodes spread them)


def test_capacity_is_ceil_of_one_plus_epsilon_times_the_mean_with_the_new_one() -> None:
    assert capacity([1, 0], 0.25) == 2  # ceil(1.25 x 2 / 2)
    assert capacity([2, 0], 0.25) == 2  # ceil(1.25 x 3 / 2) = ceil(1.875)
    assert capacity([0], 0.25) == 2  # ceil(1.25): one backend always has room
    assert capacity([9, 6], 0.25) == 10  # 16 keys over two: at most 10 on one
    assert capacity([5, 2], 0.25, headroom=8) == 12  # ceil(8 / 2) + 8: more than 1.25 x the mean allows
    assert capacity([400, 399], 0.25, headroom=8) == 500  # at load, epsilon's bound is the larger
