"""Local helper processes for benchmarks (scripted upstream, proxy): started, awaited, stopped."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deploy.health import http_ok, wait_until
from deploy.host import free_port
from deploy.paths import REPO_ROOT

__all__ = ["Cores", "Stack", "cpu_list", "free_port"]


@dataclass(frozen=True)
class Cores:
    """Which cores the model servers and the client side (proxies, relays, load generator) run on.

    vLLM's CPU build binds its threads to every core by default, so on a machine this small the
    servers fought over the cores with each other and with the proxy and load generator: two
    replicas ran at different speeds depending on which shared a core with the client side, and
    a proxy's CPU time came out of vLLM's, as it never does on a GPU box. Kept apart, each server
    gets a core of its own while one is left for the client side (as a replica gets its own GPU);
    with fewer cores the servers share theirs (two on two cores: both on one, the client side on
    the other, so the pair has one server's compute: compare placement then, not capacity)."""

    servers: tuple[tuple[int, ...], ...]
    client: tuple[int, ...]

    @classmethod
    def plan(cls, available: list[int], servers: int) -> Cores | None:
        """None on one core: nothing to keep apart."""
        if len(available) < 2:
            return None
        own = available[:min(servers, len(available) - 1)]
        return cls(tuple((own[i % len(own)],) for i in range(servers)), tuple(available[len(own):]))

    def env(self, index: int) -> dict[str, str]:
        """vLLM's own binding of its compute threads to server `index`'s cores."""
        return {"VLLM_CPU_OMP_THREADS_BIND": cpu_list(self.servers[index])}


def cpu_list(cpus: tuple[int, ...]) -> str:
    """CPU ids as vLLM's VLLM_CPU_OMP_THREADS_BIND and taskset write them: 0,1."""
    return ",".join(map(str, cpus))


class Stack:
    """The processes under test, stopped together whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], health_url: str, timeout: float = 300,
              env: Mapping[str, str] | None = None, cpus: set[int] | None = None) -> None:
        """Start argv (with `env` added to this process's environment, on `cpus` only if given) and
        wait until health_url answers 200; SystemExit naming its log if it exits first or does not
        answer within timeout seconds."""
        log_path = self.log_dir / f"{len(self.processes)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **env} if env else None)
        self.processes.append(process)
        if cpus:
            # Set at once, while the interpreter is still starting: what it spawns later inherits it.
            os.sched_setaffinity(process.pid, cpus)
        try:
            wait_until(lambda: http_ok(health_url) or process.poll() is not None, timeout, health_url)
        except TimeoutError:
            raise SystemExit(f"error: {health_url} did not answer within {timeout:.0f} s (log: {log_path})") from None
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
            raise SystemExit(f"error: {' '.join(argv)} exited with status {process.returncode}:\n{tail}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
