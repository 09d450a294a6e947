"""Routing across replicas, against scripted upstreams that record which conversation reached them:
prefix affinity keeps a conversation on one backend, sessions too; a backend that is down hands
its conversations over and gets them back; a full one overflows; least-in-flight ties go
round-robin; and backends are found by DNS (a name with several loopback addresses)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, free_port, start_service, wait_until

pytestmark = pytest.mark.e2e

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def stats(backend: Service) -> dict[str, object]:
    return httpx.get(f"{backend.base_url}/stats", timeout=10).json()  # type: ignore[no-any-return]


def firsts(backend: Service) -> list[str]:
    seen = stats(backend)["firsts"]
    assert isinstance(seen, list)
    return [str(first) for first in seen]


def metric(service: Service, sample: str) -> float:
    for line in httpx.get(f"{service.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def decisions(service: Service, reason: str) -> float:
    return metric(service, f'qwen_proxy_routing_decisions_total{{model="tiny-qwen3",reason="{reason}"}}')


def turn(service: Service, conversation: int, turns: int, headers: dict[str, str] | None = None,
         **extra: object) -> None:
    """One more turn of a conversation: its history (system, first question, answers) re-sent."""
    messages = [SYSTEM, {"role": "user", "content": f"conversation {conversation}: first question"}]
    for index in range(1, turns):
        messages += [{"role": "assistant", "content": f"answer {index}"}, {"role": "user", "content": f"more {index}"}]
    response = httpx.post(f"{service.base_url}/v1/chat/completions", timeout=30, headers=headers,
                          json={"model": "tiny-qwen3", "messages": messages, "max_tokens": 2, **extra})
    assert response.status_code == 200, response.text


def owner(backends: list[Service], conversation: int) -> list[int]:
    """Which backends saw this conversation's turns."""
    text = f"conversation {conversation}: first question"
    return [index for index, backend in enumerate(backends) if text in firsts(backend)]


@pytest.fixture
def pair(proxy: Callable[..., Service], upstream: Callable[..., Service]) -> Callable[..., tuple[Service, list[Service]]]:
    def start(**entry: object) -> tuple[Service, list[Service]]:
        backends = [upstream(), upstream()]
        service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [b.base_url for b in backends], **entry}],
                         "health_interval_seconds": 0.2})
        return service, backends
    return start


def test_each_conversation_stays_on_one_backend(pair: Callable[..., tuple[Service, list[Service]]]) -> None:
    service, backends = pair()  # prefix_affinity is the default
    for turns in range(1, 5):
        for conversation in range(40):
            turn(service, conversation, turns)
    places = [owner(backends, conversation) for conversation in range(40)]
    assert all(len(place) == 1 for place in places), places
    assert {place[0] for place in places} == {0, 1}  # 40 conversations hashed: both get some
    assert decisions(service, "new") == 40 and decisions(service, "affinity") == 120


def test_a_session_id_or_user_keeps_different_prompts_together(
        pair: Callable[..., tuple[Service, list[Service]]]) -> None:
    service, backends = pair()
    for conversation in range(12):
        turn(service, conversation, 1, headers={"X-Session-Id": "one session"})
    assert len({owner(backends, c)[0] for c in range(12)}) == 1
    for conversation in range(12, 24):
        turn(service, conversation, 1, user="one user")
    assert len({owner(backends, c)[0] for c in range(12, 24)}) == 1


def test_a_backend_that_is_down_hands_its_conversations_over_and_gets_them_back(
        pair: Callable[..., tuple[Service, list[Service]]]) -> None:
    service, backends = pair()
    turn(service, 7, 1)
    home = owner(backends, 7)[0]
    other = 1 - home
    httpx.post(f"{backends[home].base_url}/admin/health?healthy=0", timeout=10)
    up = f'qwen_proxy_backend_up{{backend="{backends[home].base_url}",model="tiny-qwen3"}}'
    wait_until(lambda: metric(service, up) == 0, 30, "the proxy to see the backend down")
    turn(service, 7, 2)
    assert owner(backends, 7) == sorted([home, other])  # the next turn went to the other one
    assert decisions(service, "failover") == 1
    httpx.post(f"{backends[home].base_url}/admin/health?healthy=1", timeout=10)
    wait_until(lambda: metric(service, up) == 1, 30, "the proxy to see the backend up again")
    turn(service, 7, 3)
    assert firsts(backends[home]).count("conversation 7: first question") == 2  # back home
    assert decisions(service, "new") == 1 and decisions(service, "affinity") == 1


def test_a_backend_over_the_load_bound_overflows_to_the_next(
        pair: Callable[..., tuple[Service, list[Service]]]) -> None:
    """epsilon 0.25, no headroom, two backends: with two of one conversation in flight on its
    backend, a third would put it over ceil(1.25 x 3 / 2) = 2, so it goes to the other."""
    service, backends = pair(affinity={"epsilon": 0.25, "headroom": 0})
    turn(service, 3, 1)
    home = owner(backends, 3)[0]

    async def two_held_then_one() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "tiny-qwen3", "max_tokens": 2, "script": "first-byte-delay=3600",
                    "messages": [SYSTEM, {"role": "user", "content": "conversation 3: first question"}]}
            held = [asyncio.create_task(client.post(f"{service.base_url}/v1/chat/completions", json=body))
                    for _ in range(2)]
            await asyncio.to_thread(wait_until, lambda: stats(backends[home])["in_flight"] == 2, 30,
                                    "two requests held on the conversation's backend")
            await asyncio.to_thread(turn, service, 3, 2)
            for task in held:
                task.cancel()

    asyncio.run(two_held_then_one())
    assert firsts(backends[1 - home]) == ["conversation 3: first question"]
    assert decisions(service, "overflow") == 1
    # Its history is cached where it went: the next turn follows it there, though home has room again.
    wait_until(lambda: stats(backends[home])["in_flight"] == 0, 30, "the held requests to end")
    affinity = decisions(service, "affinity")
    turn(service, 3, 3)
    assert firsts(backends[1 - home]) == ["conversation 3: first question"] * 2
    assert decisions(service, "affinity") == affinity + 1 and decisions(service, "overflow") == 1


def test_least_in_flight_ties_go_round_robin(pair: Callable[..., tuple[Service, list[Service]]]) -> None:
    service, backends = pair(routing="least_in_flight")
    for conversation in range(12):
        for turns in range(1, 7):
            turn(service, conversation, turns)
    assert [stats(b)["requests"] for b in backends] == [36, 36]
    assert decisions(service, "least_in_flight") == 72


# ---- DNS discovery ---------------------------------------------------------------------------------

@pytest.fixture
def hosts_file(tmp_path: Path) -> Iterator[Path]:
    """A hosts file the test controls: the proxy runs in a mount namespace where it is /etc/hosts."""
    path = tmp_path / "hosts"
    path.write_text(Path("/etc/hosts").read_text())
    yield path


def set_hosts(path: Path, name: str, addresses: list[str]) -> None:
    base = [line for line in path.read_text().splitlines() if not line.endswith(f" {name}")]
    with path.open("w") as out:  # in place: the bind mount follows the inode
        out.write("\n".join([*base, *(f"{address} {name}" for address in addresses)]) + "\n")


def test_backends_are_found_and_followed_by_dns(services: list[Service], tmp_path: Path, hosts_file: Path) -> None:
    port = free_port()
    backends = {}
    for address in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        argv = [sys.executable, "-m", "benchmarks.scripted_upstream", "--host", address, "--port", str(port)]
        backend = start_service(argv, port, "/health", tmp_path, host=address)
        services.append(backend)
        backends[address] = backend
    set_hosts(hosts_file, "pods.test", ["127.0.0.2", "127.0.0.3"])
    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps({"models": [{"profile": "tiny-qwen3", "backends": [f"http://pods.test:{port}"],
                                              "discover": True, "routing": "least_in_flight"}],
                                  "dns_refresh_seconds": 0.2, "health_interval_seconds": 0.2}))
    proxy_port = free_port()
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    proxy = start_service(["unshare", "--mount", "sh", "-c", script, "sh", str(hosts_file), sys.executable, "-m",
                           "serving", "--config", str(config), "--port", str(proxy_port)], proxy_port, "/ready",
                          tmp_path)
    services.append(proxy)

    def up(address: str) -> float | None:
        sample = f'qwen_proxy_backend_up{{backend="http://{address}:{port}",model="tiny-qwen3"}}'
        text = httpx.get(f"{proxy.base_url}/metrics", timeout=10).text
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(sample + " ")), None)

    assert (up("127.0.0.2"), up("127.0.0.3"), up("127.0.0.4")) == (1, 1, None)
    for conversation in range(4):
        turn(proxy, conversation, 1)
    assert [stats(backends[a])["requests"] for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4")] == [2, 2, 0]

    set_hosts(hosts_file, "pods.test", ["127.0.0.3", "127.0.0.4"])  # a pod replaced
    wait_until(lambda: up("127.0.0.4") == 1 and up("127.0.0.2") is None, 30, "the proxy to follow DNS")
    for conversation in range(4):
        turn(proxy, conversation, 1)
    assert [stats(backends[a])["requests"] for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4")] == [2, 4, 2]
    # The name only ever existed in the proxy's namespace.
    assert subprocess.run(["getent", "hosts", "pods.test"], capture_output=True, check=False).returncode != 0
