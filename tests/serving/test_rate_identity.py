"""Rate limits per identity: the API key when keys are configured, else the client's address,
X-Forwarded-For believed only from a trusted proxy; the limiter's memory stays bounded."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httpx
import pytest

from serving.auth import ClientAddress, RateLimiter
from serving.errors import ApiError
from tests.conftest import Service

BODY = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


def limited(proxy: Callable[..., Service], upstream: Callable[..., Service], trusted: list[str]) -> Service:
    return proxy({"models": [{"profile": "tiny-qwen3", "backends": [upstream().base_url]}],
                  "limits": {"requests_per_minute_per_key": 5, "trusted_proxies": trusted},
                  "health_interval_seconds": 3600})


def statuses(service: Service, source: str, forwarded: Sequence[str | None]) -> list[int]:
    """One request per entry, from the loopback address `source`, with that X-Forwarded-For (if any)."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=30) as client:
        return [client.post(f"{service.base_url}/v1/chat/completions", json=BODY,
                            headers={"x-forwarded-for": xff} if xff else {}).status_code for xff in forwarded]


@pytest.mark.e2e
def test_without_keys_each_client_address_has_its_own_budget(proxy: Callable[..., Service],
                                                             upstream: Callable[..., Service]) -> None:
    """Issue 24: 5 requests from 127.0.0.2 (limit 5) used to put 127.0.0.3 over the limit too."""
    service = limited(proxy, upstream, trusted=[])
    assert statuses(service, "127.0.0.2", [None] * 6) == [200] * 5 + [429]
    assert statuses(service, "127.0.0.3", [None]) == [200]


@pytest.mark.e2e
def test_forwarded_for_is_ignored_from_an_untrusted_peer(proxy: Callable[..., Service],
                                                         upstream: Callable[..., Service]) -> None:
    service = limited(proxy, upstream, trusted=["10.0.0.0/8"])
    spoofed = [f"198.51.100.{i}" for i in range(6)]  # a new "client" per request: it is still 127.0.0.2
    assert statuses(service, "127.0.0.2", spoofed) == [200] * 5 + [429]


@pytest.mark.e2e
def test_forwarded_for_from_a_trusted_proxy_names_the_client(proxy: Callable[..., Service],
                                                             upstream: Callable[..., Service]) -> None:
    service = limited(proxy, upstream, trusted=["127.0.0.2", "10.0.0.0/8"])
    # Through a trusted ingress (10.1.1.1) too: the right-most untrusted entry is the client.
    assert statuses(service, "127.0.0.2", ["198.51.100.7"] * 3 + ["203.0.113.9, 198.51.100.7, 10.1.1.1"] * 2
                    + ["198.51.100.7"]) == [200] * 5 + [429]
    assert statuses(service, "127.0.0.2", ["198.51.100.8"]) == [200]  # another client behind the same proxy
    # What the client wrote left of it does not make it someone else.
    assert statuses(service, "127.0.0.2", ["203.0.113.1, 198.51.100.7"]) == [429]


# ---- the pieces, with an injected clock --------------------------------------------------------------

def test_the_client_address() -> None:
    clients = ClientAddress(["10.0.0.0/8", "fd00::/8", "192.0.2.1"])
    xff = b"x-forwarded-for"
    assert clients.of("203.0.113.5", [(xff, b"1.2.3.4")]) == "addr:203.0.113.5"  # untrusted peer
    assert clients.of("10.0.0.1", []) == "addr:10.0.0.1"  # trusted, no header: the peer
    assert clients.of("10.0.0.1", [(xff, b"1.2.3.4, 5.6.7.8")]) == "addr:5.6.7.8"
    assert clients.of("10.0.0.1", [(xff, b"1.2.3.4"), (xff, b"5.6.7.8, 10.9.9.9")]) == "addr:5.6.7.8"  # two lines
    assert clients.of("fd00::1", [(xff, b"2001:db8::7, 192.0.2.1")]) == "addr:2001:db8::7"
    assert clients.of("10.0.0.1", [(xff, b"10.0.0.2, 10.0.0.3")]) == "addr:10.0.0.2"  # every hop trusted
    assert clients.of("10.0.0.1", [(xff, b"unknown")]) == "addr:unknown"  # not an address: never trusted
    assert clients.of("10.0.0.1", [(xff, b"x" * 500)]) == "addr:" + "x" * 64
    assert clients.of(None, []) == "addr:unknown"
    assert ClientAddress([]).of("10.0.0.1", [(xff, b"1.2.3.4")]) == "addr:10.0.0.1"  # nobody trusted


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_buckets_refill_and_refuse_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(6, clock=clock)  # one token every 10 s
    for _ in range(6):
        limiter.check("a")
    with pytest.raises(ApiError) as refused:
        limiter.check("a")
    assert refused.value.status == 429 and refused.value.headers["retry-after"] == "10"
    limiter.check("b")  # another identity
    clock.now += 10
    limiter.check("a")


def test_memory_is_bounded_whatever_the_number_of_addresses() -> None:
    clock = Clock()
    limiter = RateLimiter(5, max_identities=1000, clock=clock)
    for i in range(5000):  # a flood of addresses within a minute: the least recently seen go first
        limiter.check(f"addr:{i}")
    assert len(limiter) == 1000
    clock.now += 60  # a minute later every bucket has refilled: the same as none, dropped as requests come
    limiter.check("addr:new")
    assert len(limiter) == 1


def test_a_recently_limited_identity_is_not_forgotten_before_the_others() -> None:
    clock = Clock()
    limiter = RateLimiter(1, max_identities=3, clock=clock)
    limiter.check("heavy")
    for name in ("x", "y"):
        limiter.check(name)
    with pytest.raises(ApiError):
        limiter.check("heavy")  # refused, and now the most recently seen
    limiter.check("z")  # over the bound: "x", the least recently seen, goes
    with pytest.raises(ApiError):
        limiter.check("heavy")
