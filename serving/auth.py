"""API keys (Bearer, compared in constant time, never logged) and a per-key request-rate limit."""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from serving.errors import ApiError


class KeyCheck:
    def __init__(self, keys: list[bytes]) -> None:
        self._keys = keys

    def identify(self, authorization: bytes | None) -> str:
        """The caller's rate-limit identity; raises 401 for a missing or wrong key."""
        if not self._keys:
            return "anonymous"
        if not authorization or not authorization.startswith(b"Bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        given = authorization[7:].strip()
        matched = False
        for key in self._keys:  # every key is compared, so timing does not reveal which one matched
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        # A digest, never the key itself, names the caller in memory.
        return hashlib.sha256(given).hexdigest()[:16]


class RateLimiter:
    """A token bucket per caller: `per_minute` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int | None) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, caller: str, now: float | None = None) -> None:
        if self.per_minute is None:
            return
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        tokens, last = self._buckets.get(caller, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - last) * rate)
        if tokens < 1.0:
            retry_after = math.ceil((1.0 - tokens) / rate)
            self._buckets[caller] = (tokens, now)
            raise ApiError(429, f"rate limit of {self.per_minute} requests per minute exceeded; "
                           f"retry in {retry_after} s", code="rate_limit_exceeded",
                           headers={"retry-after": str(retry_after)})
        self._buckets[caller] = (tokens - 1.0, now)
