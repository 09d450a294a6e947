"""`python -m benchmarks` against the session's real vLLM (tiny model, CPU) and the proxy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.paths import REPO_ROOT
from tests.conftest import RunningServer, Service, free_port

pytestmark = pytest.mark.e2e


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], check=False, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def result_of(out: str) -> dict[str, Any]:
    path = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("results:"))
    data: dict[str, Any] = json.loads(Path(REPO_ROOT / path).read_text())
    return data


@pytest.fixture(scope="module")
def proxied_run(proxy_server: Service, vllm_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    out_dir = tmp_path_factory.mktemp("bench")
    done = bench("run", "--base-url", proxy_server.base_url, "--model", "tiny",  # an alias
                 "--num-requests", "32", "--concurrency", "4", "--input-len", "96", "--output-len", "32",
                 "--slo", "ttft<=5s,tpot<=500ms", "--metrics-url", vllm_server.metrics_url,
                 "--metrics-url", f"{proxy_server.base_url}/metrics", "--results-dir", str(out_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return done, result_of(done.stdout.replace(str(REPO_ROOT) + "/", "")), out_dir


def test_run_prints_a_table_and_writes_json_and_plots(proxied_run: Any) -> None:
    done, result, out_dir = proxied_run
    for row in ("request throughput (req/s)", "TTFT median / p99 (ms)", "TPOT median / p99 (ms)",
                "goodput (req/s)", "server: tokens in / out", "client ceiling on this machine"):
        assert row in done.stdout
    [run] = result["runs"]
    assert run["completed"] == 32 and run["failed"] == 0
    assert result["served_model"] == "tiny" and result["profile"] == "tiny-qwen3"
    assert run["median_ttft_ms"] > 0 and run["median_tpot_ms"] > 0 and run["request_goodput"] is not None
    assert result["client_ceiling"]["max_request_rate"] > 0
    pngs = sorted(out_dir.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "progress" not in result["config"] and result["config"]["api_key"] is None
    # No GPU here: the comparison with the forecast says so and is the only thing skipped.
    skipped = "no NVIDIA GPU on this machine (--forecast-gpu TYPE names the server's when the client runs elsewhere)"
    assert result["forecast_comparison"] == {"skipped": skipped}
    assert f"forecast comparison skipped: {skipped}" in done.stdout


def test_token_counts_agree_with_the_server(proxied_run: Any) -> None:
    _, result, _ = proxied_run
    [run] = result["runs"]
    # Exact input lengths (the tiny model's own tokenizer and chat template), fixed outputs.
    assert run["total_input_tokens"] == 32 * 96 and run["total_output_tokens"] == 32 * 32
    servers = {s["kind"]: s for s in run["server_metrics"]}
    assert servers["vllm"]["prompt_tokens"] == 32 * 96          # warm-up requests excluded
    assert servers["vllm"]["generation_tokens"] == 32 * 32
    assert servers["proxy"]["completion_tokens"] == 32 * 32
    assert servers["vllm"]["preemptions"] == 0
    # Gauges sampled while the load ran: what a sample catches depends on timing, what it can hold
    # does not (never more running than the 4 sent at once; the tiny model's KV use rounds to ~0).
    assert 0 <= servers["vllm"]["peak_requests_running"] <= 4
    assert 0 <= servers["proxy"]["peak_proxy_in_flight"] <= 4
    assert 0 <= servers["vllm"]["peak_kv_cache_usage"] <= 1


def test_rate_sweep_has_one_run_per_rate_and_a_sweep_plot(vllm_server: RunningServer, tmp_path: Path) -> None:
    done = bench("run", "--base-url", vllm_server.base_url, "--model", "tiny-qwen3", "--sweep-rates", "4,16,inf",
                 "--num-requests", "12", "--input-len", "64", "--output-len", "16", "--no-calibrate",
                 "--results-dir", str(tmp_path), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["label"] for r in result["runs"]] == ["rate=4/s", "rate=16/s", "rate=inf"]
    assert all(r["completed"] == 12 for r in result["runs"])
    assert next(tmp_path.glob("*-sweep.png")).stat().st_size > 10_000
    compared = bench("compare", str(next(tmp_path.glob("*.json"))), str(next(tmp_path.glob("*.json"))))
    assert compared.returncode == 0 and "TTFT median ms" in compared.stdout and "+0.0%" in compared.stdout


def test_reasoning_workload_reads_reasoning_through_the_proxy(proxy_server: Service, tmp_path: Path) -> None:
    # The session's vLLM runs without a reasoning parser: the workload runs, and no reasoning
    # section appears (the split is proven against the scripted upstream in test_loadgen).
    done = bench("run", "--base-url", proxy_server.base_url, "--model", "tiny-qwen3", "--workload", "reasoning",
                 "--num-requests", "4", "--concurrency", "2", "--no-calibrate", "--results-dir", str(tmp_path),
                 "--no-progress", "--no-plots")
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"]
    assert run["completed"] == 4 and run["total_output_tokens"] > 0


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "model 'nope' is not served at"),
    (["--model", "tiny-qwen3", "--rate", "0"], "argument --rate: must be > 0, got 0"),
    (["--model", "tiny-qwen3", "--slo", "ttft<2s"], "argument --slo: SLO 'ttft<2s': expected"),
    (["--model", "tiny-qwen3", "--concurrency", "2", "--rate", "3"], "choose one of --concurrency, --rate"),
    (["--model", "tiny-qwen3", "--workload", "jsonl"], "--workload jsonl needs --dataset"),
])
def test_bad_arguments_give_one_clear_line(vllm_server: RunningServer, args: list[str], message: str) -> None:
    done = bench("run", "--base-url", vllm_server.base_url, "--no-calibrate", *args, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:") or "error:" in line]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_unreachable_url_is_one_line() -> None:
    done = bench("run", "--base-url", f"http://127.0.0.1:{free_port()}", "--model", "tiny-qwen3", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: cannot reach http://127.0.0.1:")
    assert "make serve" in done.stderr and len(done.stderr.strip().splitlines()) == 1
