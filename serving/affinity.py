"""Prefix affinity: which backend a request belongs to, so its prompt prefix is in that vLLM's cache.

A request's key is its session (the `x-session-id` header, or the OpenAI `user` field) or else
the start of its prompt: for chat, the leading messages up to and including the first user
message (every turn of a conversation re-sends them); for completions, the leading text. Keys
are placed on a consistent-hash ring of the backends with bounded loads (Mirrokni, Thorup and
Zadimoghaddam 2017): a new key passes over a backend holding more than (1 + epsilon) x the mean
of the keys placed, and any request a backend carrying more than (1 + epsilon) x the mean
requests in flight and more than `headroom` above it, for the next on the ring
(serving/routing.py keeps the placements), so affinity never melts one replica, and a backend
that is down hands its keys to the next one until it returns.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

# Enough of a prompt to tell conversations apart, not so much that hashing a 100k-token
# prompt costs anything.
PREFIX_BYTES = 16 * 1024
VIRTUAL_NODES = 64  # ring points per backend: an even share of keys each


class Placed(Protocol):
    url: str


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _utf8(text: str) -> bytes:
    # Any JSON string, lone surrogates included ("\ud800" is valid JSON): hashed, never refused.
    return text.encode("utf-8", "surrogatepass")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text
        return "".join(part.get("text", "") for part in content if isinstance(part, dict)
                       and isinstance(part.get("text"), str))
    return ""


def request_key(body: dict[str, Any], chat: bool, session: bytes | None) -> int | None:
    """The request's place on the ring, or None when it has nothing to key on."""
    if session:
        return _hash(b"session\0" + session)
    user = body.get("user")
    if isinstance(user, str) and user:
        return _hash(b"user\0" + _utf8(user))
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        parts: list[str] = []
        size = 0
        for message in messages:
            if not isinstance(message, dict):
                break
            role = message.get("role")
            text = f"{role if isinstance(role, str) else ''}\x1f{_text(message.get('content'))}\x1e"
            parts.append(text)
            size += len(text)
            if role == "user" or size >= PREFIX_BYTES:
                break
        leading = _utf8("".join(parts))[:PREFIX_BYTES]
        return _hash(b"chat\0" + leading) if leading else None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch: its first prompt
    if isinstance(prompt, str) and prompt:
        return _hash(b"text\0" + _utf8(prompt)[:PREFIX_BYTES])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):  # token ids
        return _hash(b"ids\0" + ",".join(map(str, prompt[: PREFIX_BYTES // 8])).encode())
    return None


B = TypeVar("B", bound=Placed)


class Ring(Generic[B]):
    """Backends on a consistent-hash ring; rebuilt when the set of backends changes."""

    def __init__(self, backends: Sequence[B]) -> None:
        points = sorted((_hash(f"{b.url}#{i}".encode()), index) for index, b in enumerate(backends)
                        for i in range(VIRTUAL_NODES))
        self._positions = [position for position, _ in points]
        self._owners = [index for _, index in points]
        self.backends = list(backends)

    def walk(self, key: int) -> Iterator[B]:
        """Every backend once, in ring order from the key's owner."""
        if not self.backends:
            return
        start = bisect.bisect(self._positions, key)
        seen: set[int] = set()
        total = len(self._owners)
        for step in range(total):
            index = self._owners[(start + step) % total]
            if index not in seen:
                seen.add(index)
                yield self.backends[index]
                if len(seen) == len(self.backends):
                    return


def capacity(loads: Sequence[int], epsilon: float, headroom: int = 0) -> int:
    """Most a backend may carry (requests in flight, or keys placed), the new one included:
    ceil((1 + eps) x mean), or ceil(mean) + headroom if that is more."""
    mean = (sum(loads) + 1) / len(loads)
    return max(math.ceil((1 + epsilon) * mean), math.ceil(mean) + headroom)
