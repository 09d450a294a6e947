"""Several proxy worker processes on one port: requests spread, metrics summed, stopped together,
and a backend that leaves DNS leaves every worker's scrape."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, free_port, start_service, wait_until

pytestmark = pytest.mark.e2e

REQUESTS = 30


def _workers(metrics_dir: Path, kind: str) -> set[str]:
    """Worker pids that wrote metrics of a kind (counter files appear with a process's first request)."""
    return {m.group(1) for path in metrics_dir.iterdir() if (m := re.fullmatch(rf"{kind}_(\d+)\.db", path.name))}


def _listening(service: Service) -> set[str]:
    """Worker pids that started serving (each prints its line once its startup checks are done)."""
    return set(re.findall(r"qwen proxy worker (\d+) listening", service.log()))


def _sample(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in the scrape")


def test_two_workers_share_the_port_and_every_scrape_sums_both(
        proxy: Callable[..., Service], upstream: Callable[..., Service], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    metrics_dir = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    backend = upstream()
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}], "workers": 2,
                     "health_interval_seconds": 0.5})
    wait_until(lambda: len(_listening(service)) == 2, 30, "both workers' startup")

    tokens = 0
    for index in range(REQUESTS):  # a new connection each: the kernel spreads them over the workers
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1 + index % 4,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{service.base_url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line]
        assert response.status_code == 200
        tokens += json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"]
    served_by = _workers(metrics_dir, "counter")
    assert len(served_by) == 2, f"requests reached only workers {served_by}"

    # Each scrape is answered by one worker or the other; every one must report both workers' sums.
    for _ in range(8):
        text = httpx.get(f"{service.base_url}/metrics", timeout=10).text
        assert _sample(text, 'qwen_proxy_requests_total{model="tiny-qwen3",route="chat",status_class="2xx"}') \
            == REQUESTS
        assert _sample(text, 'qwen_proxy_completion_tokens_total{model="tiny-qwen3"}') == tokens
        assert _sample(text, 'qwen_proxy_time_to_first_token_seconds_count{model="tiny-qwen3"}') == REQUESTS
        assert _sample(text, 'qwen_proxy_requests_in_flight{model="tiny-qwen3"}') == 0
        assert _sample(text, f'qwen_proxy_backend_up{{backend="{backend.base_url}",model="tiny-qwen3"}}') == 1

    assert service.stop(signal.SIGTERM) == 0
    for pid in served_by:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"


def test_a_worker_dying_stops_the_proxy_with_its_workers(
        proxy: Callable[..., Service], upstream: Callable[..., Service], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Let it crash: whatever runs the proxy restarts it whole (no supervisor restart loop)."""
    metrics_dir = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    service = proxy({"models": [{"profile": "tiny-qwen3", "backends": [upstream().base_url]}], "workers": 2})
    wait_until(lambda: len(_listening(service)) == 2, 30, "both workers' startup")
    victim, survivor = sorted(_listening(service))
    os.kill(int(victim), signal.SIGKILL)
    service.process.wait(timeout=30)
    assert service.process.returncode != 0
    assert not Path(f"/proc/{survivor}").exists()
    assert f"worker {victim} exited (signal SIGKILL); stopping the others" in service.log()


def _set_hosts(path: Path, name: str, addresses: list[str]) -> None:
    base = [line for line in path.read_text().splitlines() if not line.endswith(f" {name}")]
    with path.open("w") as out:  # in place: the bind mount follows the inode
        out.write("\n".join([*base, *(f"{address} {name}" for address in addresses)]) + "\n")


def test_a_backend_that_leaves_dns_leaves_every_workers_scrape(
        services: list[Service], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With workers, backend_up was a file-backed gauge that ignores remove(): the series of a pod
    that left stayed in every scrape (its last value, 1), and the alert on it fired for a pod that
    no longer exists. The per-backend series now come from the answering worker's live backends."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    port = free_port()
    for address in ("127.0.0.2", "127.0.0.3"):
        argv = [sys.executable, "-m", "benchmarks.scripted_upstream", "--host", address, "--port", str(port)]
        services.append(start_service(argv, port, "/health", tmp_path, host=address))
    hosts = tmp_path / "hosts"  # the proxy runs in a mount namespace where this is /etc/hosts
    hosts.write_text(Path("/etc/hosts").read_text())
    _set_hosts(hosts, "pods.test", ["127.0.0.2", "127.0.0.3"])
    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps({"models": [{"profile": "tiny-qwen3", "backends": [f"http://pods.test:{port}"],
                                              "discover": True}],
                                  "workers": 2, "dns_refresh_seconds": 0.2, "health_interval_seconds": 0.2}))
    proxy_port = free_port()
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    proxy = start_service(["unshare", "--mount", "sh", "-c", script, "sh", str(hosts), sys.executable, "-m",
                           "serving", "--config", str(config), "--port", str(proxy_port)], proxy_port, "/ready",
                          tmp_path)
    services.append(proxy)
    wait_until(lambda: len(_listening(proxy)) == 2, 30, "both workers' startup")

    def series(text: str, address: str) -> list[str]:
        label = f'{{backend="http://{address}:{port}",model="tiny-qwen3"}}'
        return [line for line in text.splitlines() if label in line]

    for _ in range(8):  # a new connection each: either worker answers
        text = httpx.get(f"{proxy.base_url}/metrics", timeout=10).text
        assert _sample(text, f'qwen_proxy_backend_up{{backend="http://127.0.0.3:{port}",model="tiny-qwen3"}}') == 1

    _set_hosts(hosts, "pods.test", ["127.0.0.2"])  # a pod went away
    left = re.compile(rf"tiny-qwen3: backends http://127\.0\.0\.2:{port}$", re.MULTILINE)
    wait_until(lambda: len(left.findall(proxy.log())) == 2, 30, "both workers to follow DNS")
    for _ in range(8):
        text = httpx.get(f"{proxy.base_url}/metrics", timeout=10).text
        assert series(text, "127.0.0.3") == []
        assert _sample(text, f'qwen_proxy_backend_up{{backend="http://127.0.0.2:{port}",model="tiny-qwen3"}}') == 1
        assert _sample(text, f'qwen_proxy_backend_ejected{{backend="http://127.0.0.2:{port}",model="tiny-qwen3"}}') == 0
