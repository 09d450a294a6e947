"""API keys (Bearer, compared in constant time, never logged) and a per-identity request-rate limit.

The identity a request counts against is its API key (a digest of it) when keys are configured,
else the client's address: the TCP peer, or, when the peer is a trusted proxy
(`limits.trusted_proxies`), the right-most `X-Forwarded-For` entry that is not itself trusted (what
the nearest trusted proxy saw; entries further left are the client's to write). Limits are per
proxy process.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from serving.errors import ApiError

# Identities with a bucket at once, whatever the clients (one per address without keys): the least
# recently seen is forgotten first (it comes back with a full budget).
MAX_IDENTITIES = 100_000
MAX_ADDRESS_CHARS = 64  # an X-Forwarded-For entry kept as an identity (an IPv6 address is at most 45)
TRUST_CACHE = 4096
FORWARDED_FOR = b"x-forwarded-for"


class KeyCheck:
    def __init__(self, keys: list[bytes]) -> None:
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: bytes | None) -> str | None:
        """The caller's key digest (its rate-limit identity), None without keys; 401 for a missing or
        wrong key."""
        if not self._keys:
            return None
        if not authorization or not authorization.startswith(b"Bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        given = authorization[7:].strip()
        matched = False
        for key in self._keys:  # every key is compared, so timing does not reveal which one matched
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        # A digest, never the key itself, names the caller in memory.
        return "key:" + hashlib.sha256(given).hexdigest()[:16]


class ClientAddress:
    """The client's address for rate limits, believing X-Forwarded-For only from trusted proxies."""

    def __init__(self, trusted_proxies: list[str]) -> None:
        self._networks = [ipaddress.ip_network(item, strict=False) for item in trusted_proxies]
        self._trusted: dict[str, bool] = {}

    def of(self, peer: str | None, headers: list[tuple[bytes, bytes]]) -> str:
        if peer is None:
            return "addr:unknown"  # not a TCP client (a Unix socket): one bucket for all of them
        if not self._networks or not self.trusted(peer):
            return "addr:" + peer
        entries = [entry.strip() for name, value in headers if name == FORWARDED_FOR
                   for entry in value.decode("latin-1").split(",")]
        entries = [entry for entry in entries if entry]
        for entry in reversed(entries):
            if not self.trusted(entry):
                return "addr:" + entry[:MAX_ADDRESS_CHARS]
        # No header, or every hop is a trusted proxy: the farthest one named (or the peer) is the client.
        return "addr:" + (entries[0][:MAX_ADDRESS_CHARS] if entries else peer)

    def trusted(self, address: str) -> bool:
        known = self._trusted.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False  # not an address (a port, a name, "unknown"): never a trusted hop
            else:
                known = any(ip in network for network in self._networks)
            if len(self._trusted) >= TRUST_CACHE:
                self._trusted.clear()
            self._trusted[address] = known
        return known


class RateLimiter:
    """A token bucket per identity: `per_minute` requests a minute, bursts up to the same number.

    Memory is bounded: buckets are kept in the order they were last used, a bucket unused for a
    minute has refilled (the same as none) and is dropped from the front as requests come, and past
    `max_identities` the least recently used goes."""

    def __init__(self, per_minute: int | None, max_identities: int = MAX_IDENTITIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.max_identities = max_identities
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, caller: str) -> None:
        if self.per_minute is None:
            return
        now = self._clock()
        buckets = self._buckets
        full = float(self.per_minute)
        rate = full / 60.0
        while buckets:  # refilled ones, oldest first: amortized O(1) per request
            oldest, (_, last) = next(iter(buckets.items()))
            if now - last < 60.0:
                break
            del buckets[oldest]
        tokens, last = buckets.pop(caller, (full, now))
        tokens = min(full, tokens + (now - last) * rate)
        allowed = tokens >= 1.0
        buckets[caller] = (tokens - 1.0 if allowed else tokens, now)  # last in the order: the latest used
        if len(buckets) > self.max_identities:
            buckets.popitem(last=False)
        if not allowed:
            retry_after = math.ceil((1.0 - tokens) / rate)
            raise ApiError(429, f"rate limit of {self.per_minute} requests per minute exceeded; "
                           f"retry in {retry_after} s", code="rate_limit_exceeded",
                           headers={"retry-after": str(retry_after)})
