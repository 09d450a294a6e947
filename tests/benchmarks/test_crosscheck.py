"""Our figures agree with `vllm bench serve` (shipped with the pinned vLLM) on the same server,
prompts, sampling and concurrency: median TTFT and TPOT within 10%."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deploy.paths import REPO_ROOT
from tests.conftest import RunningServer

pytestmark = pytest.mark.e2e


def test_medians_agree_with_vllm_bench_serve(vllm_server: RunningServer) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "crosscheck", "--base-url", vllm_server.base_url,
                           "--model", "tiny-qwen3", "--num-requests", "32", "--concurrency", "4", "--rounds", "2"],
                          check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr[-2000:]
    assert "median TTFT: ours" in done.stdout and "median TPOT: ours" in done.stdout, report
    assert done.returncode == 0, report
    assert "OUTSIDE" not in done.stdout
