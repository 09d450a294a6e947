"""Run server processes, wait for them to be healthy, keep replicas running, forward signals, stop
together.

Two kinds of child: replicas (restartable), which start together, and front processes (the proxy),
each started once the replicas are healthy. A replica that dies costs only its share: it is
restarted after a backoff that doubles with each death in a row, up to a limit; the others and
the front keep serving meanwhile. A front dying, every replica having failed for good, or a stop
signal stops everything. Time is injected (clock, sleep), so the policy is tested without waiting.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

from deploy.errors import LaunchError
from deploy.health import POLL_SECONDS

STOP_GRACE_SECONDS = 30.0
HEALTH_INTERVAL_SECONDS = 2.0  # a running child's /health, between two probes
UNHEALTHY_AFTER_MISSES = 2  # probes in a row: one slow answer from a busy server is not news

STARTING, HEALTHY, UNHEALTHY, RESTARTING, FAILED, STOPPED = (
    "starting", "healthy", "unhealthy", "restarting", "failed", "stopped")
RUNNING = (STARTING, HEALTHY, UNHEALTHY)


class Supervised(Protocol):
    """What the supervisor needs of a child (deploy/child.py's process, a fake in tests)."""

    name: str
    restartable: bool
    health_url: str

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def healthy(self) -> bool: ...

    def exit_code(self) -> int | None: ...

    def signal(self, signum: int) -> None: ...

    def wait(self, timeout: float) -> bool: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    """A replica that dies is restarted after `first_backoff` seconds, doubling with each death in a
    row up to `max_backoff`; after `max_restarts` restarts in a row it is left down (reported, the
    others keep serving). Healthy for `stable_seconds`, its count starts again."""

    max_restarts: int = 5
    first_backoff: float = 1.0
    max_backoff: float = 30.0
    stable_seconds: float = 600.0

    def backoff(self, deaths: int) -> float:
        return float(min(self.max_backoff, self.first_backoff * 2 ** (deaths - 1)))


@dataclass(frozen=True)
class ChildState:
    """One child as `status` shows it."""

    name: str
    pid: int | None
    status: str
    restarts: int
    last_exit: int | None


@dataclass
class _Tracked:
    child: Supervised
    status: str = STOPPED
    pid: int | None = None
    started_at: float = 0.0
    healthy_since: float | None = None
    next_probe: float = 0.0
    restart_at: float = 0.0
    deaths: int = 0  # in a row: since it was last stable
    misses: int = 0  # /health probes failed in a row while its process runs
    restarts: int = 0
    last_exit: int | None = None


def describe_exit(code: int) -> str:
    if code > 128:
        try:
            return f"status {code} (killed by {signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"status {code}"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, children: Sequence[Supervised], startup_timeout: float,
                 policy: RestartPolicy | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 on_change: Callable[[list[ChildState]], None] | None = None,
                 health_interval: float = HEALTH_INTERVAL_SECONDS, log: Callable[[str], None] = _stderr) -> None:
        self.tracked = [_Tracked(child) for child in children]
        self.startup_timeout = startup_timeout
        self.policy = policy or RestartPolicy()
        self.clock, self.sleep, self.log = clock, sleep, log
        self.on_change = on_change
        self.health_interval = health_interval
        self.stop_signal: int | None = None

    @property
    def replicas(self) -> list[_Tracked]:
        return [t for t in self.tracked if t.child.restartable]

    @property
    def fronts(self) -> list[_Tracked]:
        return [t for t in self.tracked if not t.child.restartable]

    def states(self) -> list[ChildState]:
        return [ChildState(t.child.name, t.pid, t.status, t.restarts, t.last_exit) for t in self.tracked]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.states())

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            self.log(f"\nstopping ({signal.Signals(signum).name})...")

    def run(self, on_ready: Callable[[], None]) -> int:
        """Start everything, call on_ready, supervise until a stop; the exit status."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start_all()
            if self.stop_signal is not None:
                return self.stop()
            on_ready()
            while self.stop_signal is None:
                code = self.step()
                if code is not None:
                    return code
                self.sleep(POLL_SECONDS)
            return self.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._kill_leftovers()

    # ---- start -------------------------------------------------------------------------------
    def _start(self, tracked: _Tracked) -> None:
        tracked.child.start()
        now = self.clock()
        tracked.status, tracked.pid, tracked.started_at, tracked.healthy_since = STARTING, tracked.child.pid, now, None
        tracked.next_probe, tracked.misses = now, 0

    def start_all(self) -> None:
        """The replicas at once, then each front; LaunchError (everything stopped) if one exits
        before it is healthy or is not healthy within startup_timeout."""
        for tracked in self.replicas:
            self._start(tracked)
        self._changed()
        self._await_healthy(self.replicas)
        for tracked in self.fronts:
            if self.stop_signal is not None:
                return
            self._start(tracked)
            self._changed()
            self._await_healthy([tracked])

    def _await_healthy(self, group: list[_Tracked]) -> None:
        deadline = self.clock() + self.startup_timeout
        while self.stop_signal is None:
            for tracked in group:
                if tracked.status != STARTING:
                    continue
                code = tracked.child.exit_code()
                if code is not None:
                    tracked.last_exit = code
                    others = " (the others are stopped)" if len(self.tracked) > 1 else ""
                    self._abort(f"{tracked.child.name} exited with {describe_exit(code)} before it was healthy "
                                f"(see its log above){others}")
                if tracked.child.healthy():
                    tracked.status, tracked.healthy_since = HEALTHY, self.clock()
                    self._changed()
            waiting = [t for t in group if t.status == STARTING]
            if not waiting:
                return
            if self.clock() > deadline:
                names = "; ".join(f"{t.child.name} at {t.child.health_url}" for t in waiting)
                self._abort(f"not healthy after {self.startup_timeout:.0f} s: {names}")
            self.sleep(POLL_SECONDS)

    def _abort(self, message: str) -> None:
        self.stop()
        raise LaunchError(message)

    # ---- supervise ---------------------------------------------------------------------------
    def step(self) -> int | None:
        """One look at every child; the exit status when everything had to stop, else None."""
        now = self.clock()
        for tracked in self.tracked:
            child = tracked.child
            if tracked.status in RUNNING:
                code = child.exit_code()
                if code is not None:
                    child.kill()  # what it left in its session
                    tracked.last_exit = code
                    if not child.restartable:
                        self.log(f"{child.name} exited with {describe_exit(code)}: stopping everything")
                        self.stop()
                        return code or 1
                    self._died(tracked, code, now)
                elif tracked.status == STARTING and now - tracked.started_at > self.startup_timeout:
                    self.log(f"{child.name} was not healthy after {self.startup_timeout:.0f} s: killing it")
                    child.kill()  # seen as a death on the next step
                elif now >= tracked.next_probe:
                    self._probe(tracked, now)
            elif tracked.status == RESTARTING and now >= tracked.restart_at:
                self.log(f"restarting {child.name} (restart {tracked.deaths} of at most "
                         f"{self.policy.max_restarts} in a row)")
                tracked.restarts += 1
                self._start(tracked)
                self._changed()
        if self.replicas and all(t.status == FAILED for t in self.replicas):
            self.log("every replica has failed and none is restarted: stopping")
            self.stop()
            return 1
        return None

    def _probe(self, tracked: _Tracked, now: float) -> None:
        # Starting: every poll, to know soon; running: every health_interval.
        ok = tracked.child.healthy()
        tracked.next_probe = now + (POLL_SECONDS if tracked.status == STARTING and not ok else self.health_interval)
        tracked.misses = 0 if ok else tracked.misses + 1
        name = tracked.child.name
        if ok and tracked.status != HEALTHY:
            if tracked.status == UNHEALTHY:
                self.log(f"{name} answers /health again")
            tracked.status, tracked.healthy_since = HEALTHY, now
            self._changed()
        elif tracked.misses >= UNHEALTHY_AFTER_MISSES and tracked.status == HEALTHY:
            self.log(f"{name} stopped answering {tracked.child.health_url} (its process is running)")
            tracked.status, tracked.healthy_since = UNHEALTHY, None
            self._changed()
        if (tracked.status == HEALTHY and tracked.deaths and tracked.healthy_since is not None
                and now - tracked.healthy_since >= self.policy.stable_seconds):
            tracked.deaths = 0

    def _died(self, tracked: _Tracked, code: int, now: float) -> None:
        tracked.deaths += 1
        name = tracked.child.name
        serving = sum(1 for t in self.replicas if t.status == HEALTHY and t is not tracked)
        rest = f"{serving} other replica(s) keep serving" if serving else "no other replica is healthy"
        if tracked.deaths > self.policy.max_restarts:
            tracked.status = FAILED
            self.log(f"{name} exited with {describe_exit(code)}, {tracked.deaths} times in a row: not restarting "
                     f"it (at most {self.policy.max_restarts} restarts in a row); {rest}. See its log above, "
                     "fix the cause and start serve again")
        else:
            delay = self.policy.backoff(tracked.deaths)
            tracked.status, tracked.restart_at = RESTARTING, now + delay
            self.log(f"{name} exited with {describe_exit(code)}: restarting it in {delay:g} s; {rest}")
        self._changed()

    # ---- stop --------------------------------------------------------------------------------
    def stop(self) -> int:
        """Signal the fronts (reverse order), then every running replica at once; wait for them.

        The status: the first non-zero exit of the replicas that were running (the fronts' when
        there are no replicas), else 0."""
        signum = self.stop_signal or signal.SIGTERM
        running = [t for t in self.tracked if t.status in RUNNING]
        for tracked in reversed([t for t in running if not t.child.restartable]):
            tracked.child.signal(signum)
            self._wait([tracked])
        replicas = [t for t in running if t.child.restartable]
        for tracked in replicas:
            tracked.child.signal(signum)
        self._wait(replicas)
        codes = []
        for tracked in running:
            code = tracked.child.exit_code()
            tracked.status, tracked.last_exit = STOPPED, code
            codes.append((tracked.child.restartable, code or 0))
        self._changed()
        judged = [code for restartable, code in codes if restartable] if replicas else [code for _, code in codes]
        return next((code for code in judged if code), 0)

    def _wait(self, group: list[_Tracked]) -> None:
        deadline = self.clock() + STOP_GRACE_SECONDS
        for tracked in group:
            if not tracked.child.wait(max(0.0, deadline - self.clock())):
                self.log(f"{tracked.child.name} did not stop in {STOP_GRACE_SECONDS:.0f} s: killing it")
            tracked.child.kill()  # and whatever it left in its session

    def _kill_leftovers(self) -> None:
        for tracked in self.tracked:
            if tracked.pid is not None and tracked.child.exit_code() is None:
                tracked.child.kill()
