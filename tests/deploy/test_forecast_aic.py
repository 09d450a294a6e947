"""`plan --workload` against aiconfigurator itself (the probe in .cache/forecast-venv, which `make
test` builds): its figures equal aiconfigurator's own estimates for the same configuration
(tests/deploy/golden/forecast.json, written by tests/deploy/forecast_golden.py calling
cli_estimate directly), the shipped max_num_seqs are the forecast's, and what aiconfigurator
cannot model is refused naming what it can. One probe process answers every job of this module;
the CLI test runs a second (through `main`, as a user would)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploy.cli import main
from deploy.errors import DeployError
from deploy.forecast import aic
from deploy.forecast.choose import Target
from deploy.forecast.run import Prepared, finish, job_for, prepare
from deploy.loader import known_profiles, load_profile
from deploy.memory_plan import load_gpu_types, plan_memory
from deploy.paths import REPO_ROOT
from deploy.profile import Workload

GOLDEN = Path(__file__).parent / "golden" / "forecast.json"
GPU_TYPES = load_gpu_types()
H100 = GPU_TYPES["h100-80gb"]
SHIPPED = [name for name in known_profiles() if load_profile(name).workload is not None]


def golden() -> dict[str, Any]:
    if os.environ.get("UPDATE_GOLDEN") == "1":
        subprocess.run([str(aic.FORECAST_PYTHON), "tests/deploy/forecast_golden.py", str(GOLDEN)], cwd=REPO_ROOT,
                       check=True, timeout=1800)
    data: dict[str, Any] = json.loads(GOLDEN.read_text())
    return data


GOLDEN_DATA = golden()
CASES = GOLDEN_DATA["cases"]


def case_job(name: str) -> aic.Job:
    case = CASES[name]
    kit, call = case["kit"], case["cli_estimate"]
    profile = load_profile(kit["profile"], kit["sets"])
    workload = Workload(input=kit["workload"][0], output=kit["workload"][1])
    batches = [p["batch"] for p in case["points"]]
    return job_for(profile, call["system_name"], workload, [(call["tp_size"], call["pp_size"], batches)])


def refusal_jobs(tmp: Path) -> dict[str, aic.Job]:
    chat = Workload(input=2000, output=1000)
    foo = tmp / "foo"
    foo.mkdir()
    config = json.loads((REPO_ROOT / "configs/model-configs/qwen3-4b-instruct-2507-fp8/config.json").read_text())
    (foo / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    return {
        "architecture": job_for(load_profile("qwen3-4b-instruct-fp8", [f"offline_config={foo}"]), "h100_sxm", chat,
                                [(1, 1, [1])]),
        "no data": job_for(load_profile("qwen3-4b-instruct-fp8"), "h100_pcie", chat, [(1, 1, [1])]),
        "sglang fp8 on l40s": job_for(load_profile("qwen3-4b-instruct-fp8-sglang"), "l40s", chat, [(1, 1, [1])]),
        "fp8 on a100": job_for(load_profile("qwen3-4b-instruct-fp8"), "a100_sxm", chat, [(1, 1, [1])]),
    }


def shipped_prepared(name: str) -> Prepared:
    profile = load_profile(name)
    assert profile.workload is not None
    return prepare(profile, H100, profile.parallelism.world_size, profile.workload, GPU_TYPES)


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, aic.Answer]:
    """Every job of this module in one probe process; a job asked twice is asked once (the chat and
    QwQ golden cases are exactly what plan asks for the shipped profiles on H100)."""
    jobs = {f"shipped {name}": shipped_prepared(name).job for name in SHIPPED}
    jobs |= {name: case_job(name) for name in CASES}
    jobs |= refusal_jobs(tmp_path_factory.mktemp("models"))
    unique = {json.dumps(job.as_dict(), sort_keys=True): job for job in jobs.values()}
    answered = dict(zip(unique, aic.estimate(list(unique.values())), strict=True))
    return {name: answered[json.dumps(job.as_dict(), sort_keys=True)] for name, job in jobs.items()}


def point(data: dict[str, Any]) -> aic.Point:
    return aic.Point.parse(data)


def test_the_golden_file_is_the_pinned_aiconfigurator() -> None:
    assert GOLDEN_DATA["aiconfigurator"] == aic.pinned_version() == "0.12.0"


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_kit_asks_what_the_golden_case_asked(name: str) -> None:
    """The profile becomes exactly these cli_estimate arguments: the engine's backend, the
    profile's KV cache dtype (not aiconfigurator's fp8 guess), its memory fraction, the layout."""
    job, call = case_job(name).as_dict(), CASES[name]["cli_estimate"]
    assert Path(job["model_dir"]) == (REPO_ROOT / call["model_path"]).resolve()
    assert (job["system"], job["backend"], job["isl"], job["osl"]) == (
        call["system_name"], call["backend_name"], call["isl"], call["osl"])
    assert (job["kvcache_quant_mode"], job["free_gpu_memory_fraction"]) == (
        call["kvcache_quant_mode"], call["free_gpu_memory_fraction"])
    assert [(lay["tensor"], lay["pipeline"]) for lay in job["layouts"]] == [(call["tp_size"], call["pp_size"])]


@pytest.mark.parametrize("name", sorted(CASES))
def test_forecast_figures_equal_aiconfigurators_own(answers: dict[str, aic.Answer], name: str) -> None:
    case, answer = CASES[name], answers[name]
    call = case["cli_estimate"]
    assert answer.source is not None
    assert (answer.source.aiconfigurator, answer.source.backend, answer.source.data_version, answer.source.system) == (
        GOLDEN_DATA["aiconfigurator"], call["backend_name"], case["data_version"], call["system_name"])
    # Exact floats: the pinned venv is deterministic.
    assert answer.points[(call["tp_size"], call["pp_size"])] == [point(p) for p in case["points"]]


def test_the_issues_fp8_kv_figures(answers: dict[str, aic.Answer]) -> None:
    points = answers["qwen3-4b-instruct-fp8 on h100, fp8 KV cache"].points[(1, 1)]
    assert [round(p.figures.tokens_per_s, 3) for p in points if p.figures] == [3279.887, 6886.045]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_max_num_seqs_is_the_forecasts(answers: dict[str, aic.Answer], name: str) -> None:
    """Each GPU profile's max_num_seqs is the largest batch within its SLO that the forecast finds
    for its own layout on H100 (`python -m deploy plan NAME --gpu h100-80gb --workload`)."""
    profile = load_profile(name)
    assert profile.slo is not None
    forecast = finish(shipped_prepared(name), answers[f"shipped {name}"],
                      Target(profile.slo.ttft_ms, profile.slo.tpot_ms), GPU_TYPES)
    own = next(r for r in forecast.rows if r.layout.tensor == profile.parallelism.tensor)
    assert own.max_num_seqs == profile.max_num_seqs
    assert forecast.recommended is own  # and that layout is the one the forecast recommends


def test_an_architecture_aiconfigurator_does_not_model_is_refused(answers: dict[str, aic.Answer]) -> None:
    prepared = shipped_prepared("qwen3-4b-instruct-fp8")
    with pytest.raises(DeployError) as refused:
        finish(prepared, answers["architecture"], Target(), GPU_TYPES)
    message = str(refused.value)
    assert "does not model the architecture FooForCausalLM" in message
    assert "Qwen2ForCausalLM" in message and "Qwen3ForCausalLM" in message  # the supported list


def test_a_system_without_the_engines_data_is_refused_with_the_gpus_that_have_it(
        answers: dict[str, aic.Answer]) -> None:
    with pytest.raises(DeployError) as refused:
        finish(shipped_prepared("qwen3-4b-instruct-fp8"), answers["no data"], Target(), GPU_TYPES)
    message = str(refused.value)
    assert "aiconfigurator has no vllm data for h100_pcie" in message
    assert "h100-80gb (h100_sxm), h200 (h200_sxm), b200 (b200_sxm), a100-80gb (a100_sxm), l40s (l40s)" in message


@pytest.mark.parametrize(("job", "gpu", "expected"), [
    ("sglang fp8 on l40s", "l40s", "GEMM perf data missing for quant 'fp8_block'"),
    ("fp8 on a100", "a100-80gb", "MissingSystemFlopsError"),
])
def test_data_aiconfigurator_lacks_for_a_layout_is_refused(answers: dict[str, aic.Answer], job: str, gpu: str,
                                                           expected: str) -> None:
    answer = answers[job]
    assert answer.source is not None and expected in answer.layout_errors[(1, 1)]
    name = "qwen3-4b-instruct-fp8-sglang" if "sglang" in job else "qwen3-4b-instruct-fp8"
    profile = load_profile(name, ["max_model_len=32768"])
    prepared = prepare(profile, GPU_TYPES[gpu], 1, Workload(input=2000, output=1000), GPU_TYPES)
    with pytest.raises(DeployError, match=f"{name} on {gpu}: aiconfigurator 0.12.0 cannot model it.*{expected}"):
        finish(prepared, answer, Target(), GPU_TYPES)


def test_plan_json_is_aiconfigurators_figures_at_the_batches_it_chose(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's check, end to end through the CLI: `plan ... --workload --json` for QwQ-32B on
    two H100s, every figure aiconfigurator's own."""
    assert main(["plan", "qwq-32b", "--gpu", "h100-80gb", "--workload", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"profile", "gpu", "gpus", "workload", "source", "layouts", "recommended"} <= set(out)
    keys = {"tensor", "pipeline", "replicas", "max_num_seqs", "kv_max_seqs", "ttft_ms", "tpot_ms",
            "tokens_per_s_per_gpu", "tokens_per_s"}
    assert keys <= set(out["layouts"][0]) and keys <= set(out["recommended"])
    assert (out["profile"], out["gpu"], out["gpus"], out["workload"]) == (
        "qwq-32b", "h100-80gb", 2, {"input": 1000, "output": 8000})
    assert out["source"]["text"] == ("modelled by aiconfigurator 0.12.0 with its vllm 0.24.0 data for h100_sxm, not "
                                     "measured; that data predates the vLLM 0.32.0 this kit runs")
    # Tensor 1 holds no 131,072-token sequence: listed as excluded, not as a layout.
    assert [(e["tensor"], "does not fit" in e["reason"]) for e in out["excluded"]] == [(1, True)]
    [layout] = out["layouts"]
    assert (layout["tensor"], layout["pipeline"], layout["replicas"]) == (2, 1, 1)
    # The KV bound is the memory plan's; the batch is the largest within the SLO that aiconfigurator
    # holds, found here from aiconfigurator's own figures for every batch up to that bound.
    profile = load_profile("qwq-32b")
    assert layout["kv_max_seqs"] == plan_memory(profile, H100, 2).kv_tokens // 9000 == 37
    by_batch = {p["batch"]: p for p in CASES["qwq-32b on h100, tensor 2, reasoning"]["points"]}
    assert sorted(by_batch) == list(range(1, 38))
    within = max(b for b, p in by_batch.items()
                 if not p["oom"] and not p["kv_cache_warning"] and p["ttft_ms"] <= 2000 and p["tpot_ms"] <= 30)
    assert layout["max_num_seqs"] == within == 34
    assert (layout["ttft_ms"], layout["tpot_ms"], layout["tokens_per_s_per_gpu"], layout["tokens_per_s"]) == (
        by_batch[34]["ttft_ms"], by_batch[34]["tpot_ms"], by_batch[34]["tokens_per_s_per_gpu"],
        by_batch[34]["tokens_per_s"])
    at_kv = layout["at_kv_max_seqs"]
    assert (at_kv["tokens_per_s"], at_kv["kv_cache_warning"], at_kv["oom"]) == (
        by_batch[37]["tokens_per_s"], True, False)
    assert out["recommended"]["command"] == "python -m deploy serve qwq-32b --replicas 1 --gpus 0,1 --set max_num_seqs=34"
