"""`python -m deploy serve tiny-qwen3 --replicas 2` for real (what `make serve REPLICAS=2` runs on a
CPU box): two vLLM servers on a core each behind the proxy. Both take traffic, by each vLLM's own
request counters; one killed, the other keeps serving through the proxy and the supervisor
restarts the dead one. Synchronised on the launcher's state file and /health, never on sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy import run_state
from deploy.host import port_free, usable_cores
from deploy.layout import split
from deploy.paths import REPO_ROOT
from tests.conftest import STARTUP_TIMEOUT, free_port, http_ok, interrupt, wait_until

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    log_path: Path
    base_port: int
    proxy_port: int

    @property
    def state_file(self) -> Path:
        return run_state.state_path(self.process.pid)

    def state(self) -> run_state.ServeRecord | None:
        try:
            return run_state.ServeRecord.model_validate_json(self.state_file.read_text())
        except (OSError, ValueError):
            return None  # not written yet (the file itself is replaced whole)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def all_healthy(self) -> bool:
        state = self.state()
        return (state is not None and all(r.state == "healthy" for r in state.replicas)
                and state.proxy is not None and state.proxy.state == "healthy")


def two_free_ports() -> int:
    """A port whose next one is free too (the second replica's)."""
    while True:
        base = free_port()
        if base < 65535 and port_free(base + 1):
            return base


def finished(port: int) -> float:
    """Requests this vLLM finished, from its own /metrics (summed over finish reasons)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "vllm:request_success_total")


def converse(proxy_port: int, conversations: range) -> None:
    """One request per conversation, each its own session (the proxy keys affinity on it)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{proxy_port}", timeout=120) as client:
        for i in conversations:
            response = client.post("/v1/chat/completions", headers={"x-session-id": f"conversation-{i}"}, json={
                "model": "tiny-qwen3", "max_tokens": 4,
                "messages": [{"role": "system", "content": f"You are assistant number {i}."},
                             {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]})
            assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base, proxy = two_free_ports(), free_port()
    log_path = tmp_path_factory.mktemp("replicas") / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy", "serve", "tiny-qwen3", "--replicas", "2", "--port", str(base),
             "--proxy-port", str(proxy)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    running = Stack(process, log_path, base, proxy)
    try:
        wait_until(lambda: running.all_healthy() or process.poll() is not None, 2 * STARTUP_TIMEOUT,
                   "both replicas and the proxy to be healthy")
        if process.poll() is not None:
            raise RuntimeError(f"the launcher exited with {process.returncode}:\n{running.log_tail()}")
        yield running
    finally:
        interrupt(process, timeout=120)


def test_both_replicas_take_traffic_on_their_own_core(stack: Stack) -> None:
    state = stack.state()
    assert state is not None and [r.port for r in state.replicas] == [stack.base_port, stack.base_port + 1]
    # Each replica's compute threads are bound to its own share of this machine's cores.
    binds = []
    for replica in state.replicas:
        assert replica.pid is not None
        environ = Path(f"/proc/{replica.pid}/environ").read_bytes().split(b"\0")
        binds += [entry.split(b"=", 1)[1].decode() for entry in environ
                  if entry.startswith(b"VLLM_CPU_OMP_THREADS_BIND=")]
    assert binds == [",".join(map(str, part)) for part in split(usable_cores(), 2)]

    before = [finished(r.port) for r in state.replicas]
    converse(stack.proxy_port, range(16))
    served = [finished(r.port) - b for r, b in zip(state.replicas, before, strict=True)]
    assert sum(served) == 16, served
    assert all(count > 0 for count in served), f"one replica took all the traffic: {served}"


def test_a_killed_replica_costs_only_its_share_and_is_restarted(stack: Stack) -> None:
    state = stack.state()
    assert state is not None
    survivor, victim = state.replicas
    assert victim.pid is not None
    before = finished(survivor.port)
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(lambda: not http_ok(f"http://127.0.0.1:{victim.port}/health"), 30, "the killed replica to be down")

    # The proxy keeps answering: the conversations that were the dead replica's go to the other one.
    converse(stack.proxy_port, range(100, 108))
    back = http_ok(f"http://127.0.0.1:{victim.port}/health")  # restarted already? (it takes ~30 s)
    assert finished(survivor.port) - before + (finished(victim.port) if back else 0) == 8

    def restarted() -> bool:
        now = stack.state()
        return now is not None and now.replicas[1].state == "healthy" and now.replicas[1].pid != victim.pid

    wait_until(lambda: restarted() or stack.process.poll() is not None, 2 * STARTUP_TIMEOUT,
               "the supervisor to restart the killed replica")
    assert stack.process.poll() is None, stack.log_tail()
    now = stack.state()
    assert now is not None
    assert (now.replicas[1].restarts, now.replicas[1].last_exit) == (1, 137)
    assert (now.replicas[0].pid, now.replicas[0].restarts) == (survivor.pid, 0)  # the other was left alone
    assert "restarting it in 1 s; 1 other replica(s) keep serving" in stack.log_path.read_text()
    assert http_ok(f"http://127.0.0.1:{victim.port}/health")
    status = subprocess.run([sys.executable, "-m", "deploy", "status"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, check=True).stdout
    assert f"tiny-qwen3: 2 replica(s), launcher pid {stack.process.pid}" in status
    [row] = [line for line in status.splitlines() if line.split()[:1] == ["1"] and str(victim.port) in line]
    assert "healthy" in row and row.endswith("1 (last exit status 137)")


def test_ctrl_c_stops_everything_and_removes_the_state(stack: Stack) -> None:
    state = stack.state()
    assert state is not None and state.proxy is not None
    pids = [r.pid for r in state.replicas] + [state.proxy.pid]
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(timeout=120) == 0, stack.log_tail()
    assert not stack.state_file.exists()
    assert all(not run_state.pid_alive(pid) for pid in pids if pid is not None)
    assert not http_ok(f"http://127.0.0.1:{stack.proxy_port}/health")
