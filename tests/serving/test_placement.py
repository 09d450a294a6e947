"""Where prefix affinity places keys, on ModelBackends itself with fixed backend URLs: new keys
split evenly even when the ring gives them all to one backend, placed keys stay, a full backend's
key moves and stays moved, a down one's key comes back, and a backend that leaves drops its keys."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from serving.affinity import Ring
from serving.config import ModelEntry
from serving.metrics import Metrics
from serving.routing import Backend, ModelBackends

URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


def backends(**entry: object) -> ModelBackends:
    model = ModelBackends("m", ModelEntry.model_validate({"profile": "tiny-qwen3", "backends": URLS, **entry}),
                          Metrics(CollectorRegistry()))
    model.set_backends([Backend(url, healthy=True) for url in URLS])
    return model


def owned_by(model: ModelBackends, url: str, count: int) -> list[int]:
    """`count` keys whose ring owner is `url`: the ring alone would put every one of them there."""
    ring = Ring(model.backends)
    keys = (key * 0x9E3779B97F4A7C15 % 2**64 for key in range(1, 10_000))
    return [key for key in keys if next(ring.walk(key)).url == url][:count]


def decisions(model: ModelBackends, reason: str) -> float:
    return model.metrics.registry.get_sample_value("qwen_proxy_routing_decisions_total",
                                                   {"model": "m", "reason": reason}) or 0.0


def test_new_keys_the_ring_gives_one_backend_split_within_the_bound() -> None:
    model = backends()
    keys = owned_by(model, URLS[0], 16)
    placed = [model.pick(set(), key) for key in keys]
    counts = [sum(1 for b in placed if b is backend) for backend in model.backends]
    # ceil(1.25 x 16 / 2) = 10: the owner takes keys until it would hold more than that share.
    assert counts == [10, 6], counts
    assert decisions(model, "new") == 16
    for turn in range(4):  # every later turn of each goes where it was placed
        assert [model.pick(set(), key) for key in keys] == placed
    assert decisions(model, "affinity") == 64


def test_a_few_requests_of_imbalance_do_not_move_a_key() -> None:
    model = backends()  # headroom 8 by default
    first, second = model.backends
    key = owned_by(model, first.url, 1)[0]
    assert model.pick(set(), key) is first
    # 16 in flight there, none on the other: the 17th is ceil(1.25 x 17 / 2) = 11 over the mean
    # times 1.25, but within ceil(17 / 2) + 8 = 17.
    first.in_flight = 16
    assert model.pick(set(), key) is first
    first.in_flight = 17  # the 18th is past ceil(18 / 2) + 8 = 17
    assert model.pick(set(), key) is second
    assert decisions(model, "overflow") == 1


def test_a_full_backend_moves_the_key_for_good_and_a_down_one_gets_it_back() -> None:
    model = backends(affinity={"headroom": 0})
    first, second = model.backends
    key = owned_by(model, first.url, 1)[0]
    assert model.pick(set(), key) is first
    first.in_flight = 2  # ceil(1.25 x 3 / 2) = 2: a third would put it over
    assert model.pick(set(), key) is second
    assert decisions(model, "overflow") == 1
    first.in_flight = 0
    assert model.pick(set(), key) is second  # its history is cached there now
    second.healthy = False
    assert model.pick(set(), key) is first
    assert decisions(model, "failover") == 1
    second.healthy = True
    assert model.pick(set(), key) is second  # back where its prefix is
    assert model.pick({second}, key) is first  # a failed attempt goes elsewhere, the key stays
    assert model.pick(set(), key) is second
    assert [first.keys, second.keys] == [0, 1]


def test_a_backend_that_leaves_takes_its_keys_and_they_are_placed_afresh() -> None:
    model = backends()
    first, second = model.backends
    keys = owned_by(model, second.url, 2)  # a third would be over ceil(1.25 x 3 / 2) = 2
    assert all(model.pick(set(), key) is second for key in keys)
    model.set_backends([first])
    assert all(model.pick(set(), key) is first for key in keys)
    assert decisions(model, "new") == 4 and first.keys == 2
