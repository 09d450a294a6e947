"""A server process the launcher supervises: started in a session of its own, probed on its health
URL, signalled, and killed together with whatever it left in its session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import IO

from deploy.health import http_ok

HEALTH_TIMEOUT_SECONDS = 2.0

_OUTPUT_LOCK = threading.Lock()


@dataclass
class Child:
    """A server process in a session of its own (so the terminal's Ctrl-C reaches only the launcher,
    which forwards one signal: vLLM given two would skip its graceful shutdown)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    restartable: bool = False
    log_prefix: str | None = None  # set: each output line is prefixed (several replicas share a terminal)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    output: threading.Thread | None = field(default=None, repr=False)  # copies a prefixed child's lines

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        if self.log_prefix is None:
            self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
            return
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.process.stdout is not None
        self.output = threading.Thread(target=_copy_lines, args=(self.process.stdout, self.log_prefix.encode()),
                                       name=f"output of {self.name}", daemon=True)
        self.output.start()

    def healthy(self) -> bool:
        return http_ok(self.health_url, timeout=HEALTH_TIMEOUT_SECONDS)

    def exit_code(self) -> int | None:
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as shells report

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        if self.output is not None:
            # Its last lines, unless something it started still holds the pipe (kill() ends that).
            self.output.join(timeout=1.0)
        return True

    def kill(self) -> None:
        """SIGKILL it and whatever it started that is still in its session (vLLM's engine core would
        otherwise outlive its API server, holding the GPU the restarted replica needs)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group
        self.process.wait()


def _copy_lines(stream: IO[bytes], prefix: bytes) -> None:
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        with _OUTPUT_LOCK:
            try:
                out.write(prefix + line)
                out.flush()
            except (OSError, ValueError):
                return  # the launcher's own output is gone
