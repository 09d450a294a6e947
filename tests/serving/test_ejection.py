"""Passive outlier ejection on ModelBackends itself, with a clock the test moves: failures in a row
eject, an answer (4xx included) resets the count, the cool-down grows with each ejection up to its
cap and shrinks again in rotation, one trial request after it, never the last usable backend nor
more than max_ejected_percent, and what /ready and the metrics say meanwhile."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from serving.backend import Backend
from serving.config import ModelEntry
from serving.metrics import Metrics
from serving.routing import ModelBackends


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def model(count: int = 2, clock: Clock | None = None, routing: str = "least_in_flight",
          **ejection: object) -> ModelBackends:
    urls = [f"http://10.0.0.{i + 1}:8000" for i in range(count)]
    entry = ModelEntry.model_validate({"profile": "tiny-qwen3", "backends": urls, "routing": routing,
                                       "outlier_ejection": ejection})
    backends = ModelBackends("m", entry, Metrics(CollectorRegistry()), clock or Clock())
    backends.set_backends([Backend(url, healthy=True) for url in urls])
    return backends


def fail(backends: ModelBackends, backend: Backend, times: int) -> None:
    for _ in range(times):
        backends.report(backend, False)


def sample(backends: ModelBackends, name: str, backend: Backend) -> float | None:
    return backends.metrics.registry.get_sample_value(name, {"model": "m", "backend": backend.url})


def picks(backends: ModelBackends, count: int) -> list[Backend]:
    """Where `count` requests go one after the other (each finished before the next)."""
    chosen = []
    for _ in range(count):
        backend = backends.pick(set(), None)
        assert backend is not None
        chosen.append(backend)
    return chosen


def test_five_failures_in_a_row_eject_and_requests_go_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    backends = model()
    bad, good = backends.backends
    fail(backends, bad, 4)
    assert bad in picks(backends, 2)  # four are not enough
    with caplog.at_level(logging.WARNING, "serving"):
        fail(backends, bad, 1)
    assert picks(backends, 6) == [good] * 6
    assert backends.health() == {"healthy": 1, "ejected": 1,
                                 "backends": {bad.url: "ejected", good.url: "up"}}
    assert sample(backends, "qwen_proxy_backend_ejections_total", bad) == 1
    assert sample(backends, "qwen_proxy_backend_ejected", bad) == 1
    assert sample(backends, "qwen_proxy_backend_ejected", good) == 0
    assert sample(backends, "qwen_proxy_backend_up", bad) == 1  # its /health still answers: up, yet ejected
    assert f"{bad.url} (m) out of rotation for 30 s after 5 failed requests in a row" in caplog.text


def test_an_answer_resets_the_count_and_a_client_error_is_an_answer() -> None:
    backends = model()
    bad, _ = backends.backends
    for _ in range(3):
        fail(backends, bad, 4)
        backends.report(bad, True)  # e.g. a 400 for a client's bad request: the backend answered
    assert backends.health()["ejected"] == 0 and sample(backends, "qwen_proxy_backend_ejections_total", bad) is None


def test_after_the_cool_down_one_trial_request_then_back_in_rotation() -> None:
    clock = Clock()
    backends = model(clock=clock)
    bad, good = backends.backends
    fail(backends, bad, 5)
    clock.now += 29.9
    assert backends.pick(set(), None) is good
    clock.now += 0.1
    assert backends.health()["backends"][bad.url] == "half_open"
    # Exactly one request goes to it while that one is in flight; the others go on to the good one.
    good.in_flight = 1  # busier than the half-open one: least-in-flight sends it the next request
    trial = backends.pick(set(), None)
    assert trial is bad
    bad.in_flight += 1
    assert picks(backends, 3) == [good] * 3
    bad.in_flight, good.in_flight = 0, 0
    backends.report(bad, True)
    assert backends.health() == {"healthy": 2, "ejected": 0, "backends": {bad.url: "up", good.url: "up"}}
    assert set(picks(backends, 4)) == {bad, good}
    assert sample(backends, "qwen_proxy_backend_ejected", bad) == 0


def test_a_failed_trial_ejects_again_for_longer_up_to_the_cap() -> None:
    clock = Clock()
    backends = model(clock=clock, base_ejection_seconds=30, max_ejection_seconds=100)
    bad, good = backends.backends
    good.in_flight = 1  # busier: whenever the bad one is usable, least-in-flight sends it the next request
    fail(backends, bad, 5)
    cool_downs = []
    for _ in range(4):
        start = clock.now
        while backends.health()["backends"][bad.url] == "ejected":
            clock.now += 1
        cool_downs.append(clock.now - start)
        assert backends.pick(set(), None) is bad  # its trial
        backends.report(bad, False)
    assert cool_downs == [30, 60, 90, 100]
    assert sample(backends, "qwen_proxy_backend_ejections_total", bad) == 5


def test_time_in_rotation_shortens_the_next_cool_down() -> None:
    """Each base_ejection_seconds back in rotation forgives one ejection."""
    clock = Clock()
    backends = model(clock=clock, base_ejection_seconds=30)
    bad, _ = backends.backends
    fail(backends, bad, 5)
    clock.now += 30
    backends.report(bad, False)  # the trial fails: out for 60 s
    clock.now += 60
    backends.report(bad, True)  # back in rotation, having been ejected twice
    clock.now += 30  # one base period in rotation: once forgiven
    fail(backends, bad, 5)
    clock.now += 59
    assert backends.health()["backends"][bad.url] == "ejected"  # 2 x 30 s, not 3 x 30 s
    clock.now += 1
    assert backends.health()["backends"][bad.url] == "half_open"


def test_answers_to_requests_sent_before_the_ejection_do_not_end_it() -> None:
    clock = Clock()
    backends = model(clock=clock)
    bad, _ = backends.backends
    fail(backends, bad, 5)
    backends.report(bad, True)  # a stream that started before the ejection, ending well
    clock.now += 10
    assert backends.health()["backends"][bad.url] == "ejected"
    backends.set_health(bad, True)  # nor does its /health answering: it did that while failing
    assert backends.health()["backends"][bad.url] == "ejected"


def test_the_last_usable_backend_is_never_ejected(caplog: pytest.LogCaptureFixture) -> None:
    backends = model()
    bad, other = backends.backends
    other.healthy = False  # down by its /health
    with caplog.at_level(logging.WARNING, "serving"):
        fail(backends, bad, 20)
    assert backends.health() == {"healthy": 1, "ejected": 0, "backends": {bad.url: "up", other.url: "down"}}
    assert backends.pick(set(), None) is bad
    assert f"{bad.url} (m) failed 5 requests in a row but stays in rotation: the last usable backend" in caplog.text
    assert caplog.text.count("stays in rotation") == 1  # throttled, not one line per request
    one = model(1)
    fail(one, one.backends[0], 20)
    assert one.health()["ejected"] == 0


def test_at_most_max_ejected_percent_and_at_least_one() -> None:
    backends = model(4, max_ejected_percent=50)
    for backend in backends.backends[:3]:
        fail(backends, backend, 5)
    assert backends.health()["ejected"] == 2  # half of four
    assert backends.health()["backends"][backends.backends[2].url] == "up"
    none_allowed = model(2, max_ejected_percent=0)
    fail(none_allowed, none_allowed.backends[0], 5)
    assert none_allowed.health()["ejected"] == 1  # one may always go (as with Envoy's always_eject_one_host)


def test_zero_consecutive_failures_turns_ejection_off() -> None:
    backends = model(consecutive_failures=0)
    bad, _ = backends.backends
    fail(backends, bad, 100)
    assert backends.health()["ejected"] == 0


def test_when_every_healthy_backend_is_ejected_they_still_serve() -> None:
    """One ejected, then the other goes down: a suspect backend beats a certain 503."""
    backends = model()
    bad, other = backends.backends
    fail(backends, bad, 5)
    other.healthy = False
    assert backends.pick(set(), None) is bad


def test_an_ejected_backends_conversations_fail_over_and_come_back() -> None:
    clock = Clock()
    backends = model(clock=clock, routing="prefix_affinity")
    first, second = backends.backends
    key = next(k for k in range(1, 1000) if backends.pick(set(), k * 7919) is first) * 7919
    fail(backends, first, 5)
    assert backends.pick(set(), key) is second  # failover: the key stays home
    clock.now += 30
    assert backends.pick(set(), key) is first  # home is half-open: this request is its trial
    backends.report(first, True)
    assert backends.pick(set(), key) is first
