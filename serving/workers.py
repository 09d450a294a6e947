"""Several proxy processes on one port: a supervisor that starts and stops the workers.

One process serves one event loop on one core; `workers: N` runs N of them. Each worker binds
the port with SO_REUSEPORT, so the kernel spreads new connections across them. Metrics stay
whole: every worker writes its counters and histograms to PROMETHEUS_MULTIPROC_DIR (the
prometheus-client multiprocess mode) and whichever worker answers /metrics reports the sum.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from serving.metrics import MULTIPROC_ENV


def supervise(argv: list[str], workers: int) -> int:
    """Run `python -m serving <argv> --as-worker` N times until SIGTERM/SIGINT; forward signals.

    A worker that exits on its own stops the others and the supervisor: whatever runs the proxy
    (Kubernetes, systemd, `make serve`) sees the failure and restarts it whole, rather than a
    supervisor restarting a worker that fails again in a loop.
    """
    # A directory the user named is used (and emptied: stale files from an earlier run would be
    # summed in); otherwise a private one, removed at exit.
    given = os.environ.get(MULTIPROC_ENV)
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="qwen-proxy-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    command = [sys.executable, "-m", "serving", *argv, "--as-worker"]
    stopping = False
    children: dict[int, subprocess.Popen[bytes]] = {}

    def forward(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            child.send_signal(sig)  # a second signal reaches the workers too: they exit at once

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"qwen proxy: {workers} worker processes, metrics summed through {directory}", flush=True)
    for _ in range(workers):
        child = subprocess.Popen(command, env=env)
        children[child.pid] = child
    status = 0
    try:
        while children:
            try:
                pid, code = os.wait()
            except ChildProcessError:
                break
            if children.pop(pid, None) is None:
                continue
            _mark_dead(pid, directory)
            if code != 0 and not stopping:
                print(f"qwen proxy: worker {pid} exited ({_describe(code)}); stopping the others", flush=True)
                status = os.WEXITSTATUS(code) if os.WIFEXITED(code) else 1
                forward(signal.SIGTERM, None)
    finally:
        for child in children.values():
            child.kill()
        if not given:
            shutil.rmtree(directory, ignore_errors=True)
    return status


def _mark_dead(pid: int, directory: Path) -> None:
    # Live gauges (requests in flight) must stop counting a dead worker's last values.
    multiprocess.mark_process_dead(pid, str(directory))


def _describe(code: int) -> str:
    if os.WIFSIGNALED(code):
        return f"signal {signal.Signals(os.WTERMSIG(code)).name}"
    return f"exit code {os.WEXITSTATUS(code)}"
