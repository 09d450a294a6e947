"""The proxy-overhead benchmark runs end to end and reports what it claims: a row per cell with the
three modes (direct, proxy, bare relay), the same number of events per response in each (no
coalescing), no errors, and the CPU columns filled. Its figures are printed, never asserted here:
they are timings on a shared machine."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

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
