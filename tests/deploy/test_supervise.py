"""The supervisor's policy on fake children and an injected clock (nothing waits for real time):
replicas start together and the proxy after them; a dead replica is restarted after a doubling
backoff while the others keep serving, and left down after the limit; the proxy dying, every
replica failing or a stop signal stops everything. Then what only real processes show."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

import psutil
import pytest

from deploy.child import Child
from deploy.errors import LaunchError
from deploy.supervise import (
    FAILED,
    HEALTHY,
    RESTARTING,
    STARTING,
    STOPPED,
    UNHEALTHY,
    ChildState,
    RestartPolicy,
    Supervisor,
)
from tests.conftest import wait_until

PIDS = count(1000)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Fake:
    """A child that answers /health `healthy_after` seconds after it starts, until it dies."""

    name: str
    clock: Clock
    events: list[str]
    restartable: bool = True
    healthy_after: float = 1.0
    exit_on_signal: int = 0
    health_url: str = "http://fake/health"
    answers: bool = True
    starts: int = 0
    kills: int = 0
    code: int | None = None
    running: bool = False
    started_at: float = 0.0
    current_pid: int | None = None
    signals: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.current_pid

    def start(self) -> None:
        self.starts += 1
        self.running, self.code, self.started_at = True, None, self.clock()
        self.current_pid = next(PIDS)
        self.events.append(f"start {self.name} at {self.clock():g}")

    def healthy(self) -> bool:
        return self.running and self.answers and self.clock() - self.started_at >= self.healthy_after

    def exit_code(self) -> int | None:
        return None if self.running else self.code

    def die(self, code: int) -> None:
        self.running, self.code = False, code

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.events.append(f"signal {self.name}")
        if self.running:
            self.die(self.exit_on_signal)

    def wait(self, timeout: float) -> bool:
        return not self.running

    def kill(self) -> None:
        self.kills += 1
        if self.running:
            self.die(137)


class Stack:
    """Two replicas and a proxy under a supervisor that sleeps by advancing the fake clock."""

    def __init__(self, policy: RestartPolicy | None = None, startup_timeout: float = 100.0,
                 on_sleep: Callable[[float], None] | None = None, **replica: object) -> None:
        self.clock = Clock()
        self.events: list[str] = []
        self.logged: list[str] = []
        self.changes: list[list[ChildState]] = []
        self.a = Fake("a", self.clock, self.events, **replica)  # type: ignore[arg-type]
        self.b = Fake("b", self.clock, self.events, **replica)  # type: ignore[arg-type]
        self.proxy = Fake("proxy", self.clock, self.events, restartable=False)
        self.on_sleep = on_sleep

        def sleep(seconds: float) -> None:
            self.clock.advance(seconds)
            if self.on_sleep is not None:
                self.on_sleep(self.clock())

        self.supervisor = Supervisor([self.a, self.b, self.proxy], startup_timeout, policy, clock=self.clock,
                                     sleep=sleep, on_change=self.changes.append, log=self.logged.append)

    def states(self) -> dict[str, str]:
        return {s.name: s.status for s in self.supervisor.states()}

    def after(self, seconds: float) -> int | None:
        self.clock.advance(seconds)
        return self.supervisor.step()


# ---- start -------------------------------------------------------------------------------------

def test_replicas_start_together_and_the_proxy_once_they_are_healthy() -> None:
    stack = Stack(healthy_after=5.0)
    stack.supervisor.start_all()
    assert stack.events[:2] == ["start a at 0", "start b at 0"]
    [proxy_start] = [e for e in stack.events if e.startswith("start proxy")]
    assert float(proxy_start.rsplit(" ", 1)[1]) >= 5.0
    assert stack.states() == {"a": HEALTHY, "b": HEALTHY, "proxy": HEALTHY}


def test_a_replica_dying_before_it_is_healthy_stops_everything() -> None:
    stack = Stack(healthy_after=50.0)
    stack.on_sleep = lambda now: stack.b.die(1) if now >= 3 else None
    with pytest.raises(LaunchError, match=r"^b exited with status 1 before it was healthy \(see its log above\) "
                                          r"\(the others are stopped\)$"):
        stack.supervisor.start_all()
    assert stack.a.signals and not stack.a.running
    assert stack.proxy.starts == 0


def test_startup_timeout_names_what_did_not_answer() -> None:
    stack = Stack(healthy_after=float("inf"), startup_timeout=10)
    with pytest.raises(LaunchError, match=r"not healthy after 10 s: a at http://fake/health; b at http://fake/health"):
        stack.supervisor.start_all()
    assert not stack.a.running and not stack.b.running


# ---- a replica dies ----------------------------------------------------------------------------

def test_a_dead_replica_is_restarted_after_a_backoff_while_the_rest_serve() -> None:
    stack = Stack()
    stack.supervisor.start_all()
    first_pid = stack.a.pid
    stack.a.die(137)
    assert stack.after(0) is None
    assert stack.states() == {"a": RESTARTING, "b": HEALTHY, "proxy": HEALTHY}
    assert stack.a.kills == 1  # what it left in its session is killed before the restart
    assert stack.logged[-1] == ("a exited with status 137 (killed by SIGKILL): restarting it in 1 s; "
                                "1 other replica(s) keep serving")
    assert stack.after(0.75) is None and stack.a.starts == 1  # not before the backoff
    assert stack.after(0.25) is None and stack.a.starts == 2
    assert stack.states()["a"] == STARTING
    assert stack.after(1.0) is None
    assert stack.states() == {"a": HEALTHY, "b": HEALTHY, "proxy": HEALTHY}
    assert not stack.b.signals and not stack.proxy.signals and stack.b.starts == 1
    last = {s.name: s for s in stack.changes[-1]}
    assert last["a"].pid not in (None, first_pid) and last["a"].restarts == 1 and last["a"].last_exit == 137


def test_backoff_doubles_and_the_replica_is_left_down_after_the_limit() -> None:
    stack = Stack(RestartPolicy(max_restarts=3, first_backoff=1.0, max_backoff=3.0), healthy_after=10.0)
    stack.supervisor.start_all()
    delays = []
    for _ in range(3):
        stack.a.die(1)
        stack.after(0)
        delays.append(stack.logged[-1].split("restarting it in ")[1].split(";")[0])
        starts = stack.a.starts
        while stack.a.starts == starts:
            assert stack.after(0.25) is None
    assert delays == ["1 s", "2 s", "3 s"]  # doubled, capped at max_backoff
    stack.a.die(1)
    assert stack.after(0) is None
    assert stack.states() == {"a": FAILED, "b": HEALTHY, "proxy": HEALTHY}
    assert stack.logged[-1].startswith("a exited with status 1, 4 times in a row: not restarting it (at most 3 "
                                       "restarts in a row); 1 other replica(s) keep serving")
    assert stack.after(3600) is None and stack.a.starts == 4
    assert not stack.b.signals and not stack.proxy.signals


def test_a_replica_healthy_for_long_gets_its_budget_back() -> None:
    stack = Stack(RestartPolicy(max_restarts=1, stable_seconds=100.0))
    stack.supervisor.start_all()
    stack.a.die(1)
    stack.after(0)
    stack.after(1.0)  # restarted
    stack.after(1.0)  # healthy
    assert stack.states()["a"] == HEALTHY
    stack.after(100.0)  # stable: the count starts again
    stack.a.die(1)
    stack.after(0)
    assert stack.states()["a"] == RESTARTING and "restarting it in 1 s" in stack.logged[-1]


def test_without_stable_time_the_second_death_in_a_row_is_the_last() -> None:
    stack = Stack(RestartPolicy(max_restarts=1, stable_seconds=100.0))
    stack.supervisor.start_all()
    stack.a.die(1)
    stack.after(0)
    stack.after(1.0)
    stack.after(1.0)
    stack.a.die(1)
    stack.after(0)
    assert stack.states()["a"] == FAILED


def test_a_restarted_replica_that_never_answers_is_killed_and_counts_as_a_death() -> None:
    stack = Stack(startup_timeout=30.0)
    stack.supervisor.start_all()
    stack.a.healthy_after = float("inf")
    stack.a.die(1)
    stack.after(0)
    stack.after(1.0)
    assert stack.states()["a"] == STARTING
    stack.after(30.5)
    assert stack.logged[-1] == "a was not healthy after 30 s: killing it" and not stack.a.running
    stack.after(0)
    assert stack.states()["a"] == RESTARTING and "exited with status 137" in stack.logged[-1]


def test_a_running_replica_that_stops_answering_is_reported_not_restarted() -> None:
    stack = Stack()
    stack.supervisor.start_all()
    stack.a.answers = False
    stack.after(2.0)
    assert stack.states()["a"] == HEALTHY  # one missed probe is a busy server, not news
    stack.after(2.0)
    assert stack.states()["a"] == UNHEALTHY and stack.a.starts == 1
    assert stack.logged[-1] == "a stopped answering http://fake/health (its process is running)"
    stack.a.answers = True
    stack.after(2.0)
    assert stack.states()["a"] == HEALTHY and stack.logged[-1] == "a answers /health again"


# ---- what stops everything ---------------------------------------------------------------------

def test_every_replica_failed_stops_everything() -> None:
    stack = Stack(RestartPolicy(max_restarts=0))
    stack.supervisor.start_all()
    stack.a.die(1)
    assert stack.after(0) is None and stack.states()["a"] == FAILED
    stack.b.die(1)
    assert stack.after(0) == 1
    assert stack.logged[-1] == "every replica has failed and none is restarted: stopping"
    assert stack.proxy.signals == [signal.SIGTERM] and not stack.proxy.running


@pytest.mark.parametrize("code", [0, 2])
def test_the_proxy_dying_stops_everything(code: int) -> None:
    stack = Stack()
    stack.supervisor.start_all()
    stack.proxy.die(code)
    assert stack.after(0) == (code or 1)
    assert stack.logged[-1] == f"proxy exited with status {code}: stopping everything"
    assert stack.a.signals == [signal.SIGTERM] and stack.b.signals == [signal.SIGTERM]
    assert set(stack.states().values()) == {STOPPED}


def test_stop_signals_the_proxy_first_and_returns_the_first_replica_failure() -> None:
    stack = Stack()
    stack.supervisor.start_all()
    stack.b.exit_on_signal = 3
    stack.supervisor.stop_signal = signal.SIGINT
    assert stack.supervisor.stop() == 3
    signalled = [e for e in stack.events if e.startswith("signal")]
    assert signalled == ["signal proxy", "signal a", "signal b"]
    assert stack.a.signals == [signal.SIGINT]


def test_run_supervises_until_a_stop_signal() -> None:
    ready: list[float] = []
    stack = Stack()
    stack.a.healthy_after = 2.0

    def later(now: float) -> None:
        if now >= 3.0 and stack.b.starts == 1:
            stack.b.die(137)  # restarted while running
        if now >= 20.0:
            stack.supervisor.stop_signal = signal.SIGTERM

    stack.on_sleep = later
    assert stack.supervisor.run(on_ready=lambda: ready.append(stack.clock())) == 0
    assert len(ready) == 1 and ready[0] >= 2.0
    assert stack.b.starts == 2 and set(stack.states().values()) == {STOPPED}


# ---- real processes ------------------------------------------------------------------------------

LEAVES_A_CHILD = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(child.pid, flush=True)
    sys.exit(3)
""")


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_kill_ends_what_a_dead_child_left_in_its_session() -> None:
    """vLLM's engine core outliving its API server would hold the GPU the restart needs."""
    child = Child("leaves", [sys.executable, "-c", LEAVES_A_CHILD], env={}, health_url="http://127.0.0.1:9/")
    # Started as Child.start() does (its own session), with a pipe to learn the grandchild's pid.
    child.process = subprocess.Popen(child.argv, start_new_session=True, stdout=subprocess.PIPE, text=False)
    assert child.process.stdout is not None
    orphan = int(child.process.stdout.readline())
    assert child.wait(60) and child.exit_code() == 3
    assert not gone(orphan)
    child.kill()
    wait_until(lambda: gone(orphan), 30, f"pid {orphan} to end")


def test_several_replicas_output_is_prefixed(capfd: pytest.CaptureFixture[str]) -> None:
    child = Child("r", [sys.executable, "-c", "print('one'); print('two')"], env={}, health_url="http://127.0.0.1:9/",
                  log_prefix="[replica 1] ")
    child.start()
    assert child.process is not None and child.process.wait(60) == 0
    assert child.output is not None
    child.output.join()
    assert capfd.readouterr().out == "[replica 1] one\n[replica 1] two\n"
