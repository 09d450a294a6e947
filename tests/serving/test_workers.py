"""Several proxy worker processes on one port: requests spread, metrics summed, stopped together."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, wait_until

pytestmark = pytest.mark.e2e

REQUESTS = 30


def _workers(metrics_dir: Path, kind: str) -> set[str]:
    """Worker pids that wrote metrics of a kind (counter files appear with a process's first request)."""
    return {m.group(1) for path in metrics_dir.iterdir() if (m := re.fullmatch(rf"{kind}_(\d+)\.db", path.name))}


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
    wait_until(lambda: len(_workers(metrics_dir, "gauge_livemostrecent")) == 2, 30, "both workers' health checks")

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
    wait_until(lambda: len(_workers(metrics_dir, "gauge_livemostrecent")) == 2, 30, "both workers' health checks")
    victim, survivor = sorted(_workers(metrics_dir, "gauge_livemostrecent"))
    os.kill(int(victim), signal.SIGKILL)
    service.process.wait(timeout=30)
    assert service.process.returncode != 0
    assert not Path(f"/proc/{survivor}").exists()
    assert f"worker {victim} exited (signal SIGKILL); stopping the others" in service.log()
