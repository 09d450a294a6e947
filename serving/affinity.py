"""Prefix affinity: which backend a request belongs to, so its prompt prefix is in that vLLM's cache.

A request's key is its session (the `x-session-id` header, or the OpenAI `user` field) or else
the start of its prompt: for chat, the leading messages up to and including the first user
message (every turn of a conversation re-sends them); for completions, the leading text. Keys
are placed on a consistent-hash ring of the backends with bounded loads (Mirrokni, Thorup and
Zadimoghaddam 2017): a new key passes over a backend holding more than (1 + epsilon) x the mean
of the live keys placed, and any request a backend carrying more than (1 + epsilon) x the mean
requests in flight and more than `headroom` above it, for the next on the ring
(serving/routing.py decides), so affinity never melts one replica, and a backend that is down
hands its keys to the next one until it returns. `Placements` remembers where each key went;
only keys used within `LIVE_SECONDS` count toward a backend's share, so a backend that is new
or was away is not owed the keys of conversations that ended long ago.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

# Enough of a prompt to tell conversations apart, not so much that hashing a 100k-token
# prompt costs anything.
PREFIX_BYTES = 16 * 1024
VIRTUAL_NODES = 64  # ring points per backend: an even share of keys each
# A key counts toward its backend's share while used this recently: longer than a user takes to
# read an answer and type the next turn, short enough that the conversations of a replica that
# was away (or of the one that took them meanwhile) stop weighing on new placements within minutes.
LIVE_SECONDS = 300.0
# Keys remembered per model with the backend they were placed on (least recently used forgotten
# first): bounded memory whatever the clients send.
PLACED_KEYS = 65_536


class Placed(Protocol):
    url: str


class Counted(Placed, Protocol):
    keys: int  # live keys placed on it (Placements keeps the count)


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
C = TypeVar("C", bound=Counted)


class Placements(Generic[C]):
    """Each key seen, with the backend holding its prefix (where it was placed or moved to).

    Live keys (used within `live_seconds`) are counted on their backend (`keys`); older ones are
    still remembered, so a conversation that resumes goes back to its history, but weigh on no
    placement. Both are least recently used first, so expiry and forgetting cost O(1) per key."""

    def __init__(self, live_seconds: float = LIVE_SECONDS, limit: int = PLACED_KEYS) -> None:
        self.live_seconds = live_seconds
        self.limit = limit
        self._live: OrderedDict[int, tuple[C, float]] = OrderedDict()  # key -> (backend, last used)
        self._idle: OrderedDict[int, C] = OrderedDict()
        self._expired_at = float("-inf")

    def __len__(self) -> int:
        return len(self._live) + len(self._idle)

    def home(self, key: int, now: float) -> C | None:
        """Where the key's prefix is, if it was placed (expiring what was not used lately first)."""
        live = self._live
        if now - self._expired_at >= 1.0:  # a second's precision is plenty for a window of minutes
            self._expired_at = now
            horizon = now - self.live_seconds
            while live:
                oldest, (backend, used) = next(iter(live.items()))
                if used >= horizon:
                    break
                del live[oldest]
                backend.keys -= 1
                self._idle[oldest] = backend
        entry = live.get(key)
        return entry[0] if entry is not None else self._idle.get(key)

    def place(self, key: int, backend: C, now: float) -> None:
        """The key is (still) on `backend` and was used now."""
        live = self._live
        entry = live.get(key)
        if entry is not None and entry[0] is backend:  # the common case: another turn where it was
            live[key] = (backend, now)
            live.move_to_end(key)
            return
        entry = live.pop(key, None)
        if entry is None:
            if self._idle.pop(key, None) is None and len(self) >= self.limit:
                self._forget_oldest()
            backend.keys += 1
        elif entry[0] is not backend:
            entry[0].keys -= 1
            backend.keys += 1
        self._live[key] = (backend, now)

    def keep_only(self, staying: Iterable[C]) -> None:
        """Forget the keys of backends that left: their cache left with them."""
        kept = set(staying)
        for key, (backend, _) in list(self._live.items()):
            if backend not in kept:
                del self._live[key]
                backend.keys -= 1
        for key, backend in list(self._idle.items()):
            if backend not in kept:
                del self._idle[key]

    def _forget_oldest(self) -> None:
        if self._idle:
            self._idle.popitem(last=False)
        else:
            _, (backend, _) = self._live.popitem(last=False)
            backend.keys -= 1


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
