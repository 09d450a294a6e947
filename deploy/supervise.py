"""Run server processes in order, wait for each to be healthy, forward signals, stop together."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from deploy.errors import LaunchError
from deploy.health import POLL_SECONDS, http_ok, wait_until

STOP_GRACE_SECONDS = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        # A session of its own: the terminal's Ctrl-C reaches only the launcher, which forwards
        # one signal; otherwise vLLM would get two and skip its graceful shutdown.
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True)

    def healthy(self) -> bool:
        return http_ok(self.health_url)

    def exit_code(self) -> int | None:
        assert self.process is not None
        code = self.process.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as shells report

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


class Supervisor:
    """Starts children in order (each healthy before the next), then waits on all of them.

    The first child is the main one: the supervisor exits with its status.
    """

    def __init__(self, children: list[Child], startup_timeout: float) -> None:
        self.children = children
        self.startup_timeout = startup_timeout
        self.stop_signal: int | None = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            print(f"\nstopping ({signal.Signals(signum).name})...", file=sys.stderr, flush=True)

    def run(self, on_ready: Callable[[], None]) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                child.start()
                self._wait_healthy(child)
                if self.stop_signal is not None:
                    return self._stop()
            on_ready()
            while self.stop_signal is None:
                for child in self.children:
                    code = child.exit_code()
                    if code is not None:
                        print(f"{child.name} exited with status {code}", file=sys.stderr)
                        main_code = self._stop()
                        # A front process dying unexpectedly is a failure even if vLLM stops cleanly.
                        return main_code if child is self.children[0] else (code or 1)
                time.sleep(POLL_SECONDS)
            return self._stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._kill_leftovers()

    def _wait_healthy(self, child: Child) -> None:
        """Until the child answers its health URL, exits, or a stop signal arrives."""
        try:
            wait_until(lambda: child.healthy() or child.exit_code() is not None or self.stop_signal is not None,
                       self.startup_timeout, f"{child.name} at {child.health_url}")
        except TimeoutError:
            self._stop()
            raise LaunchError(
                f"{child.name} was not healthy at {child.health_url} after {self.startup_timeout:.0f} s"
            ) from None
        code = child.exit_code()
        if code is not None:
            self._stop()
            raise LaunchError(f"{child.name} exited with status {code} before it was healthy (see its log above)")

    def _stop(self) -> int:
        """Signal children in reverse order (front first), wait for them, return the main status."""
        signum = self.stop_signal or signal.SIGTERM
        for child in reversed(self.children):
            child.signal(signum)
            self._wait_exit(child)
        code = self.children[0].exit_code()
        return 0 if code is None else code

    @staticmethod
    def _wait_exit(child: Child) -> None:
        if child.process is None:
            return
        try:
            child.process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"{child.name} did not stop in {STOP_GRACE_SECONDS:.0f} s: killing it", file=sys.stderr)
            child.process.kill()
            child.process.wait()

    def _kill_leftovers(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
                child.process.wait()
