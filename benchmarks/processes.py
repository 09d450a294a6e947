"""Local helper processes for benchmarks (scripted upstream, proxy): started, awaited, stopped."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from deploy.health import http_ok, wait_until
from deploy.host import free_port
from deploy.paths import REPO_ROOT

__all__ = ["Stack", "free_port"]


class Stack:
    """The processes under test, stopped together whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], health_url: str, timeout: float = 300) -> None:
        """Start argv and wait until health_url answers 200; SystemExit naming its log if it
        exits first or does not answer within timeout seconds."""
        log_path = self.log_dir / f"{len(self.processes)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
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
