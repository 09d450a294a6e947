"""The proxy-overhead benchmark runs end to end and reports what it claims: a row per cell, the
same number of events per response both ways (no coalescing), no errors, the proxy's CPU per event."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deploy.paths import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_scripted_cell_reports_events_errors_and_proxy_cpu() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.proxy_overhead", "--upstreams", "scripted",
                           "--concurrency", "4", "--seconds", "1", "--rounds", "1"],
                          check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("scripted ")]
    assert len(rows) == 1, done.stdout
    row = rows[0]
    # ... ratio, events direct, "/", events proxy, errors, proxy CPU us/event
    events_direct, slash, events_proxy, errors, cpu_per_event = row[-5:]
    assert slash == "/"
    assert events_direct == events_proxy == "66"  # 64 token events, the usage event and [DONE]
    assert errors == "0"
    assert 0 < float(cpu_per_event) < 10_000
    assert 0 < float(row[-6]) < 5  # tokens/s through the proxy as a fraction of direct
