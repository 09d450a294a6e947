"""The proxy-overhead benchmark runs end to end and reports what it claims: a row per cell with the
three modes (direct, proxy, bare relay), the same number of events per response in each (no
coalescing), no errors, and the CPU columns filled. Its figures are printed, never asserted here:
they are timings on a shared machine."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from benchmarks.scripted_upstream import until_next_step
from deploy.paths import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_scripted_cell_reports_three_modes_events_errors_and_cpu() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.proxy_overhead", "--upstreams", "scripted",
                           "--concurrency", "4", "--seconds", "1", "--rounds", "1"],
                          check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    header = done.stdout.splitlines()[0].split()
    assert header[:3] == ["upstream", "streams", "TTFT"] and "d/p/b" in header
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("scripted ")]
    assert len(rows) == 1, done.stdout
    # ... events d/p/b, errors, CPU us/event proxy, bare, proxy/bare
    events, errors, cpu_proxy, cpu_bare, cpu_ratio = rows[0][-5:]
    assert events == "66/66/66"  # 64 token events, the usage event and [DONE], in every mode
    assert errors == "0"
    assert all(math.isfinite(float(value)) for value in (cpu_proxy, cpu_bare, cpu_ratio))
    assert "(steps pacing)" in done.stdout  # the scripted upstream on vLLM's step clock by default


@pytest.mark.parametrize(("now", "step", "left"), [(1.013, 0.02, 0.007), (0.75, 0.25, 0.25), (0.0, 0.05, 0.05),
                                                   (7.049, 0.05, 0.001)])
def test_engine_steps_wait_for_the_next_step_of_one_shared_clock(now: float, step: float, left: float) -> None:
    # Streams that start at different times still emit in the same steps: each waits to a multiple.
    assert until_next_step(now, step) == pytest.approx(left)
    assert (now + until_next_step(now, step)) / step == pytest.approx(round((now + left) / step))
