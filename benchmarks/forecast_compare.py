"""A benchmark beside the forecast: measured output tokens/s, TTFT and TPOT next to what
aiconfigurator models for the same profile, workload and layout (`plan --workload`), with their
ratio, so the first run on a GPU box shows how close the model is to that box.

A closed-loop point at concurrency C against R replicas of the profile's tensor x pipeline is
forecast at batch C / R per replica (aiconfigurator's batch is requests always in flight), for
the bench's fixed input and output lengths, on the GPU type this machine's nvidia-smi names
(`--forecast-gpu` names it when the client runs elsewhere). R is counted from the proxy's
`qwen_proxy_backend_up` for the model (1 against a bare engine; `--replicas` overrides). Where
any of that is missing (no GPU, a workload of varying lengths, an open loop, no forecast venv),
the comparison says why it is skipped and the benchmark's own figures stand as they are.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from deploy.errors import DeployError
from deploy.forecast import aic
from deploy.forecast.run import job_for
from deploy.memory_plan import GpuType, load_gpu_types
from deploy.profile import Profile, Workload

BACKEND_UP = "qwen_proxy_backend_up"
# (label, the run's key); the forecast's figure is kept under the same key.
COMPARED = (("output tokens/s", "output_throughput"), ("TTFT median (ms)", "median_ttft_ms"),
            ("TPOT median (ms)", "median_tpot_ms"))


def nvidia_gpu_name(run: Callable[[list[str]], str | None] | None = None) -> str | None:
    """The first GPU's name as nvidia-smi prints it, or None without an NVIDIA GPU."""
    def smi(argv: list[str]) -> str | None:
        if shutil.which(argv[0]) is None:
            return None
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    out = (run or smi)(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    names = [line.strip() for line in (out or "").splitlines() if line.strip()]
    return names[0] if names else None


def gpu_type_of(name: str, gpu_types: dict[str, GpuType]) -> GpuType | None:
    """The configs/gpus.yaml type whose nvidia_smi pattern matches the name nvidia-smi printed."""
    return next((gpu for gpu in gpu_types.values() if gpu.nvidia_smi and re.search(gpu.nvidia_smi, name)), None)


def count_backends(metrics_text: str, models: frozenset[str]) -> int | None:
    """Healthy backends the proxy routes the model to; None when the text is not the proxy's."""
    found = None
    for family in text_string_to_metric_families(metrics_text):
        if family.name != BACKEND_UP:
            continue
        found = sum(1 for s in family.samples if s.labels.get("model") in models and s.value == 1)
    return found


def replicas_behind(base_url: str, models: frozenset[str]) -> int:
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return 1
    return count_backends(text, models) or 1


def skip_reason(result: dict[str, Any], profile: Profile | None) -> str | None:
    config = result["config"]
    if profile is None:
        return f"{result['served_model']} has no profile in configs/models"
    if profile.device != "cuda":
        return f"{profile.name} runs on the CPU (device: cpu); the forecast models NVIDIA GPUs"
    fixed = (config["workload"] == "synthetic" and config["output_len"] is not None
             and config["input_dist"] == "fixed" and config["output_dist"] == "fixed")
    if not fixed:
        return ("the forecast is for fixed lengths: --workload synthetic with --input-len and --output-len "
                "(fixed distributions)")
    if not any(run.get("max_concurrency") and run.get("request_rate") is None for run in result["runs"]):
        return "the forecast models a closed loop: run with --concurrency or --sweep-concurrency"
    return None


Estimate = Callable[[list[aic.Job]], list[aic.Answer]]


def compare(result: dict[str, Any], profile: Profile | None, gpu: GpuType | None, replicas: int,
            estimate: Estimate = aic.estimate) -> dict[str, Any]:
    """{"skipped": why} or {"source", "gpu", "layout", "points": [per closed-loop run]}."""
    if gpu is None:
        return {"skipped": "no NVIDIA GPU on this machine (--forecast-gpu TYPE names the server's when the client "
                           "runs elsewhere)"}
    reason = skip_reason(result, profile)
    if reason is not None or profile is None:
        return {"skipped": reason}
    if gpu.aiconfigurator is None:
        return {"skipped": f"aiconfigurator has no data for {gpu.name}"}
    config, par = result["config"], profile.parallelism
    runs = [run for run in result["runs"] if run.get("max_concurrency") and run.get("request_rate") is None]
    batches = {run["label"]: max(1, round(run["max_concurrency"] / replicas)) for run in runs}
    workload = Workload(input=config["input_len"], output=config["output_len"])
    try:
        job = job_for(profile, gpu.aiconfigurator, workload, [(par.tensor, par.pipeline, sorted(set(batches.values())))])
        [answer] = estimate([job])
    except DeployError as exc:
        return {"skipped": str(exc)}
    if answer.source is None or answer.layout_errors:
        return {"skipped": answer.error or "; ".join(answer.layout_errors.values())}
    by_batch = {p.batch: p for p in answer.points[(par.tensor, par.pipeline)]}
    points = []
    for run in runs:
        point = by_batch[batches[run["label"]]]
        forecast = None
        if point.figures is not None:
            f = point.figures
            forecast = {"output_throughput": f.tokens_per_s * replicas, "median_ttft_ms": f.ttft_ms,
                        "median_tpot_ms": f.tpot_ms}
        points.append({"label": run["label"], "batch_per_replica": point.batch, "oom": point.oom,
                       "kv_cache_warning": point.kv_cache_warning, "forecast": forecast,
                       "measured": {key: run.get(key) for _, key in COMPARED}})
    return {
        "source": answer.source.text,
        "gpu": gpu.name, "replicas": replicas, "tensor": par.tensor, "pipeline": par.pipeline,
        "workload": {"input": workload.input, "output": workload.output}, "points": points,
    }


def _ratio(measured: float | None, forecast: float | None) -> str:
    if measured is None or not forecast:
        return "-"
    return f"{measured / forecast:.2f}"


def table(comparison: dict[str, Any]) -> str:
    if "skipped" in comparison:
        return f"forecast comparison skipped: {comparison['skipped']}"
    c = comparison
    lines = [(f"beside the forecast: {c['replicas']} replica(s) of tensor {c['tensor']} x pipeline {c['pipeline']} on "
              f"{c['gpu']}, {c['workload']['input']:,} tokens in and {c['workload']['output']:,} out; the forecast "
              f"is {c['source']}")]
    width = max(len(label) for label, _ in COMPARED) + 4
    for point in c["points"]:
        lines.append(f"{point['label']} ({point['batch_per_replica']} in flight per replica)")
        lines.append(" " * width + "measured".rjust(12) + "forecast".rjust(12) + "ratio".rjust(8))
        for label, key in COMPARED:
            measured = point["measured"][key]
            forecast = point["forecast"][key] if point["forecast"] else None
            shown = "OOM" if point["oom"] else f"{forecast:,.1f}"
            lines.append(("  " + label).ljust(width) + ("-" if measured is None else f"{measured:,.1f}").rjust(12)
                         + shown.rjust(12) + _ratio(measured, forecast).rjust(8))
        if point["kv_cache_warning"]:
            lines.append("  (more in flight than aiconfigurator's memory model holds: its figures assume no queueing)")
    return "\n".join(lines)


def for_run(result: dict[str, Any], profile: Profile | None, base_url: str, models: frozenset[str],
            gpu_name: str | None, replicas: int | None) -> dict[str, Any]:
    """The comparison for a finished run, finding the GPU and the replicas where not given."""
    gpu_types = load_gpu_types()
    if gpu_name is not None:
        gpu = gpu_types.get(gpu_name)
        if gpu is None:
            return {"skipped": f"--forecast-gpu {gpu_name} is not in configs/gpus.yaml; known: {', '.join(gpu_types)}"}
    else:
        smi = nvidia_gpu_name()
        gpu = gpu_type_of(smi, gpu_types) if smi else None
        if smi and gpu is None:
            return {"skipped": f"this machine's GPU ({smi}) matches no nvidia_smi pattern in configs/gpus.yaml"}
    return compare(result, profile, gpu, replicas or replicas_behind(base_url, models))
