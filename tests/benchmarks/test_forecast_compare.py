"""`make bench` beside the forecast, on injected figures: the batch per replica it asks for, the
ratio table, the GPU and replica detection, and each reason the comparison is skipped."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import forecast_compare as fc
from deploy.forecast import aic
from deploy.forecast.aic import Figures, Point
from deploy.loader import load_profile
from deploy.memory_plan import load_gpu_types

GPU_TYPES = load_gpu_types()
H100 = GPU_TYPES["h100-80gb"]


def result(workload: str = "synthetic", output_len: int | None = 1000, runs: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    return {
        "served_model": "qwen3-4b-instruct",
        "config": {"workload": workload, "input_len": 2000, "output_len": output_len, "input_dist": "fixed",
                   "output_dist": "fixed"},
        "runs": runs if runs is not None else [
            {"label": "concurrency=16", "max_concurrency": 16, "request_rate": None, "output_throughput": 1200.0,
             "median_ttft_ms": 150.0, "median_tpot_ms": 12.5},
            {"label": "concurrency=228", "max_concurrency": 228, "request_rate": None, "output_throughput": 6000.0,
             "median_ttft_ms": 400.0, "median_tpot_ms": 40.0},
        ],
    }


class FakeAiconfigurator:
    """Answers like the probe: 100 output tokens/s per request in flight, TPOT 10 ms + 0.1 per request."""

    def __init__(self) -> None:
        self.jobs: list[aic.Job] = []

    def __call__(self, jobs: list[aic.Job]) -> list[aic.Answer]:
        self.jobs += jobs
        [job] = jobs
        [(tensor, pipeline, batches)] = job.layouts
        points = [Point(b, Figures(100.0 + b, 10.0 + b / 10, 100.0 * b, 100.0 * b / tensor), kv_cache_warning=b > 100)
                  for b in batches]
        return [aic.Answer(source=aic.Source("0.12.0", job.backend, "0.24.0", job.system),
                           points={(tensor, pipeline): points})]


def test_each_closed_loop_point_is_forecast_per_replica_with_the_ratio() -> None:
    fake = FakeAiconfigurator()
    out = fc.compare(result(), load_profile("qwen3-4b-instruct-fp8"), H100, replicas=2, estimate=fake)
    [job] = fake.jobs
    # The profile's layout and KV cache, the bench's lengths, concurrency / replicas in flight per replica.
    assert (job.system, job.backend, job.isl, job.osl, job.kvcache_quant_mode) == (
        "h100_sxm", "vllm", 2000, 1000, "bfloat16")
    assert job.layouts == [(1, 1, [8, 114])]
    first, second = out["points"]
    assert (first["batch_per_replica"], second["batch_per_replica"]) == (8, 114)
    # Output tokens/s of both replicas; TTFT and TPOT are each request's.
    assert first["forecast"] == {"output_throughput": 1600.0, "median_ttft_ms": 108.0, "median_tpot_ms": 10.8}
    assert second["kv_cache_warning"] is True
    text = fc.table(out)
    assert text.startswith("beside the forecast: 2 replica(s) of tensor 1 x pipeline 1 on h100-80gb, 2,000 tokens in "
                           "and 1,000 out; the forecast is modelled by aiconfigurator 0.12.0 with its vllm 0.24.0 data "
                           "for h100_sxm, not measured")
    lines = text.splitlines()
    assert lines[1] == "concurrency=16 (8 in flight per replica)"
    assert lines[3].split() == ["output", "tokens/s", "1,200.0", "1,600.0", "0.75"]  # measured / forecast
    assert lines[4].split() == ["TTFT", "median", "(ms)", "150.0", "108.0", "1.39"]
    assert lines[5].split() == ["TPOT", "median", "(ms)", "12.5", "10.8", "1.16"]
    assert "more in flight than aiconfigurator's memory model holds" in lines[-1]


def test_an_oom_point_shows_no_forecast() -> None:
    comparison = {"source": "modelled", "gpu": "h100-80gb", "replicas": 1, "tensor": 1, "pipeline": 1,
                  "workload": {"input": 2000, "output": 1000},
                  "points": [{"label": "concurrency=999", "batch_per_replica": 999, "oom": True,
                              "kv_cache_warning": False, "forecast": None,
                              "measured": {"output_throughput": 1.0, "median_ttft_ms": None, "median_tpot_ms": 2.0}}]}
    rows = fc.table(comparison).splitlines()[3:]
    assert [row.split()[-3:] for row in rows] == [["1.0", "OOM", "-"], ["-", "OOM", "-"], ["2.0", "OOM", "-"]]


@pytest.mark.parametrize(("changes", "profile", "reason"), [
    ({}, "tiny-qwen3", "tiny-qwen3 runs on the CPU"),
    ({}, None, "qwen3-4b-instruct has no profile in configs/models"),
    ({"workload": "reasoning", "output_len": None}, "qwen3-4b-instruct-fp8", "the forecast is for fixed lengths"),
    ({"runs": [{"label": "rate=4/s", "max_concurrency": None, "request_rate": 4.0}]}, "qwen3-4b-instruct-fp8",
     "the forecast models a closed loop"),
])
def test_what_the_forecast_cannot_compare_is_skipped_saying_why(changes: dict[str, Any], profile: str | None,
                                                                reason: str) -> None:
    fake = FakeAiconfigurator()
    out = fc.compare(result(**changes), load_profile(profile) if profile else None, H100, 1, estimate=fake)
    assert out["skipped"].startswith(reason) and fake.jobs == []
    assert fc.table(out) == f"forecast comparison skipped: {out['skipped']}"


def test_without_a_gpu_the_comparison_is_skipped_first() -> None:
    out = fc.compare(result(), load_profile("qwen3-4b-instruct-fp8"), None, 1, estimate=FakeAiconfigurator())
    assert out == {"skipped": "no NVIDIA GPU on this machine (--forecast-gpu TYPE names the server's when the client "
                              "runs elsewhere)"}
    assert fc.nvidia_gpu_name(lambda argv: None) is None


def test_a_gpu_without_aiconfigurator_data_is_skipped() -> None:
    out = fc.compare(result(), load_profile("qwen3-4b-instruct-fp8"), GPU_TYPES["l4"], 1, estimate=FakeAiconfigurator())
    assert out == {"skipped": "aiconfigurator has no data for l4"}


@pytest.mark.parametrize(("name", "gpu"), [
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H100 PCIe", "h100-80gb"), ("NVIDIA H100 NVL", None),
    ("NVIDIA H200", "h200"), ("NVIDIA B200", "b200"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"), ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"),
])
def test_the_gpu_type_from_nvidia_smis_name(name: str, gpu: str | None) -> None:
    smi = fc.nvidia_gpu_name(lambda argv: f"{name}\n{name}\n")
    assert smi == name
    found = fc.gpu_type_of(smi, GPU_TYPES)
    assert (found.name if found else None) == gpu


def test_replicas_are_the_proxys_healthy_backends_for_the_model() -> None:
    text = """# TYPE qwen_proxy_backend_up gauge
qwen_proxy_backend_up{model="qwen3-4b-instruct",backend="http://a:8100"} 1.0
qwen_proxy_backend_up{model="qwen3-4b-instruct",backend="http://b:8101"} 1.0
qwen_proxy_backend_up{model="qwen3-4b-instruct",backend="http://c:8102"} 0.0
qwen_proxy_backend_up{model="other",backend="http://d:8103"} 1.0
"""
    assert fc.count_backends(text, frozenset({"qwen3-4b-instruct"})) == 2
    assert fc.count_backends("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0.0\n",
                             frozenset({"x"})) is None
