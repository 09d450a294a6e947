"""Where prefix affinity places keys, on ModelBackends itself with fixed backend URLs and a clock
the test moves: new keys split evenly even when the ring gives them all to one backend, placed
keys stay, a full backend's key moves and stays moved, a down one's key comes back, a backend
that leaves drops its keys; a backend that joins takes new keys up to the in-flight bound and no
further, and keys not used lately weigh on no placement."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from serving.affinity import LIVE_SECONDS, Ring, capacity
from serving.backend import Backend
from serving.config import ModelEntry
from serving.metrics import Metrics
from serving.routing import ModelBackends

URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def backends(clock: Clock | None = None, **entry: object) -> ModelBackends:
    model = ModelBackends("m", ModelEntry.model_validate({"profile": "tiny-qwen3", "backends": URLS, **entry}),
                          Metrics(CollectorRegistry()), clock or Clock())
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


def spread(count: int, start: int = 0) -> list[int]:
    """`count` keys spread over the ring (as many conversations' prompts hash), none of owned_by's."""
    return [key * 0xD1B54A32D192ED03 % 2**64 for key in range(start + 1, start + count + 1)]


def join_with(new: int) -> tuple[int, int]:
    """300 conversations placed on A while B was away, then B healthy and `new` conversations
    arriving together (each still in flight when the next comes): how many each took."""
    model = backends()
    a, b = model.backends
    b.healthy = False
    assert all(model.pick(set(), key) is a for key in spread(300))  # idle conversations: nothing in flight
    b.healthy = True
    took = {a: 0, b: 0}
    for key in spread(new, start=300):
        chosen = model.pick(set(), key)
        assert chosen is not None
        chosen.in_flight += 1
        took[chosen] += 1
        # Never more than (1 + epsilon) x the mean in flight, the new one included.
        assert b.in_flight <= capacity([a.in_flight, b.in_flight - 1], 0.25)
    assert decisions(model, "new") == 300 + new
    return took[a], took[b]


def test_a_joining_backend_takes_new_conversations_up_to_the_in_flight_bound_then_the_others_do() -> None:
    """Issue 24's scale-out: B holds no keys, so the key bound sends it every new conversation, but
    only while it carries no more than (1 + epsilon) x the mean in flight over both: then A takes
    them. Before, B took all 120 (A had room, but the fallback stayed among the key bound's
    choices). The headroom that keeps a conversation on its backend does not apply to a new one
    (no history anywhere): at 16 in flight it would have let B carry all 16."""
    assert join_with(120) == (45, 75)  # ceil(1.25 x 120 / 2) = 75
    assert join_with(16) == (6, 10)  # ceil(1.25 x 16 / 2) = 10


def test_keys_not_used_lately_weigh_on_no_placement_but_still_find_their_history() -> None:
    """A backend that was away is not owed the keys of conversations that ended: 300 keys placed on
    A five minutes ago no longer count, so 16 new ones split as on fresh backends (before, all 16
    went to B, 300 being far over the key bound). An old conversation that resumes still goes
    back to A, where its history is."""
    clock = Clock()
    model = backends(clock)
    a, b = model.backends
    b.healthy = False
    old = spread(300)
    assert all(model.pick(set(), key) is a for key in old)
    assert a.keys == 300
    clock.now += LIVE_SECONDS + 1
    b.healthy = True
    placed = [model.pick(set(), key) for key in owned_by(model, b.url, 16)]
    # ceil(1.25 x 16 / 2) = 10: the ring owner B takes keys until it would hold more than that share.
    assert [sum(1 for p in placed if p is backend) for backend in (a, b)] == [6, 10]
    assert (a.keys, b.keys) == (6, 10)
    assert model.pick(set(), old[0]) is a and a.keys == 7  # live again, counted again
    assert decisions(model, "affinity") == 1


def test_keys_in_use_keep_counting() -> None:
    """Only disuse expires a key: one used every minute stays live for good."""
    clock = Clock()
    model = backends(clock)
    a, _ = model.backends
    key = owned_by(model, a.url, 1)[0]
    for _ in range(10):
        assert model.pick(set(), key) is a
        clock.now += LIVE_SECONDS / 5
    assert a.keys == 1
