"""`plan --workload` without aiconfigurator: the layouts and their KV bounds (the memory plan's),
the tensor rules, the SLO batch and the recommendation on injected figures, the JSON shape and
the serve command, the typed workload and SLO, and every refusal made before the probe runs.
What aiconfigurator itself answers is tests/deploy/test_forecast_aic.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main
from deploy.errors import DeployError, ProfileError
from deploy.forecast import aic
from deploy.forecast.aic import Figures, Point
from deploy.forecast.choose import BATCH_CAP, Row, Target, batches, recommend, row
from deploy.forecast.layouts import Layout, layouts
from deploy.forecast.report import as_json, as_text, serve_argv
from deploy.forecast.run import Forecast, prepare
from deploy.loader import load_profile
from deploy.memory_plan import ModelShape, load_gpu_types, plan_memory, tensor_refusal
from deploy.paths import REPO_ROOT
from deploy.profile import Workload

GPU_TYPES = load_gpu_types()
H100, H200 = GPU_TYPES["h100-80gb"], GPU_TYPES["h200"]
CHAT, REASONING = Workload(input=2000, output=1000), Workload(input=1000, output=8000)


def fig(ttft: float, tpot: float, tokens: float, gpus: int = 1) -> Figures:
    return Figures(ttft_ms=ttft, tpot_ms=tpot, tokens_per_s=tokens, tokens_per_s_per_gpu=tokens / gpus)


# ---- layouts and the KV bound -------------------------------------------------------------------

def test_layouts_fill_the_gpus_with_the_tensor_sizes_the_engines_accept() -> None:
    found, excluded = layouts(load_profile("qwen3-4b-instruct-fp8"), H100, 8, CHAT, 2.0)
    assert [(lay.tensor, lay.replicas) for lay in found] == [(1, 8), (2, 4), (4, 2)]
    # 9728 / 8 = 1216 inputs of down_proj per GPU: not whole 128-wide FP8 blocks; vLLM and SGLang refuse it.
    [eight] = excluded
    assert eight.tensor == 8 and "down_proj's 9728 inputs into 1216 per GPU" in eight.reason


@pytest.mark.parametrize(("name", "gpu", "gpus", "workload", "expected"), [
    ("qwen3-4b-instruct-fp8", "h100-80gb", 8, CHAT, [159, 328, 666]),
    ("qwen3-4b-instruct-fp8", "h200", 8, CHAT, [291, 593, 1197]),
    ("qwq-32b", "h100-80gb", 8, REASONING, [37, 101, 231]),
    ("qwen3-4b-thinking-fp8-sglang", "h100-80gb", 2, REASONING, [51, 106]),
])
def test_the_kv_bound_is_the_memory_plans(name: str, gpu: str, gpus: int, workload: Workload,
                                          expected: list[int]) -> None:
    """kv_max_seqs = the plan's KV tokens per replica // (IN + OUT), at each layout's own split."""
    profile = load_profile(name)
    found, _ = layouts(profile, GPU_TYPES[gpu], gpus, workload, 2.0)
    planned = [plan_memory(profile, GPU_TYPES[gpu], lay.gpus_per_replica, tensor=lay.tensor).kv_tokens
               // workload.tokens for lay in found]
    assert [lay.kv_max_seqs for lay in found] == planned == expected


def test_a_layout_the_memory_plan_refuses_is_excluded_with_its_reason() -> None:
    found, excluded = layouts(load_profile("qwq-32b"), H100, 2, REASONING, 2.0)
    assert [(lay.tensor, lay.replicas) for lay in found] == [(2, 1)]
    [one] = excluded
    assert one.tensor == 1 and "less than one 131,072-token sequence (max_model_len)" in one.reason
    # The native-context profile fits one GPU, though its KV cache holds few reasoning requests.
    short, _ = layouts(load_profile("qwq-32b-short"), H100, 2, REASONING, 2.0)
    assert [(lay.tensor, lay.replicas, lay.kv_max_seqs) for lay in short] == [(1, 2, 4), (2, 1, 37)]


def test_gpus_that_a_tensor_size_would_leave_idle_are_not_a_layout() -> None:
    found, excluded = layouts(load_profile("qwen3-4b-instruct-fp8"), H100, 6, CHAT, 2.0)
    assert [(lay.tensor, lay.replicas) for lay in found] == [(1, 6), (2, 3)]  # 4 would idle 2 of the 6
    assert [(e.tensor, e.reason) for e in excluded] == [
        (3, "does not divide the model's 32 attention heads"), (6, "does not divide the model's 32 attention heads")]


def test_the_profiles_pipeline_is_kept() -> None:
    found, _ = layouts(load_profile("qwq-32b-short", ["parallelism.pipeline=2"]), H100, 8, CHAT, 2.0)
    assert [(lay.tensor, lay.pipeline, lay.replicas) for lay in found] == [(1, 2, 4), (2, 2, 2), (4, 2, 1)]
    with pytest.raises(DeployError, match="parallelism.pipeline 2 needs at least 2 GPUs; --gpus is 1"):
        layouts(load_profile("qwq-32b-short", ["parallelism.pipeline=2"]), H100, 1, CHAT, 2.0)


def shape(heads: int, kv_heads: int, intermediate: int = 4096, block: tuple[int, int] | None = None) -> ModelShape:
    config: dict[str, object] = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": heads * 128,
              "head_dim": 128, "intermediate_size": intermediate, "num_hidden_layers": 2, "vocab_size": 1000}
    if block:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    return ModelShape.from_config(config)


@pytest.mark.parametrize(("model", "tensor", "refused"), [
    (shape(40, 8), 5, "neither divides nor is a multiple of the model's 8 KV heads"),  # vLLM: divide(8, 5)
    (shape(40, 8), 8, None),
    (shape(32, 4), 8, None),  # more ranks than KV heads: each head replicated on 2 ranks
    (shape(32, 4), 3, "does not divide the model's 32 attention heads"),
    (shape(12, 4), 6, "neither divides nor is a multiple of the model's 4 KV heads"),
    (shape(32, 8, 9728, (128, 128)), 4, None),  # 2432 = 19 blocks
    (shape(32, 8, 9728, (128, 128)), 8, "splits down_proj's 9728 inputs into 1216 per GPU"),
    (shape(32, 8, 9728), 8, None),  # not block-quantized: no block rule
])
def test_tensor_rules(model: ModelShape, tensor: int, refused: str | None) -> None:
    reason = tensor_refusal(model, tensor)
    assert (reason is None) if refused is None else (reason is not None and reason.startswith(refused))


# ---- the SLO batch and the recommendation, on injected figures ----------------------------------

def test_the_batch_within_the_slo_is_the_largest_scanned_not_bisected() -> None:
    """TPOT is not monotonic in the batch: 5 fails, 6 meets it again (a bisection from 8 would
    stop at 4); a batch aiconfigurator's memory does not hold never counts, whatever its figures."""
    lay = Layout(tensor=1, pipeline=1, replicas=1, kv_max_seqs=9)
    tpots = {1: 10.0, 2: 12.0, 3: 14.0, 4: 19.0, 5: 21.0, 6: 19.5, 7: 22.0}
    points = [Point(b, fig(100.0, tpot, 100.0 * b)) for b, tpot in tpots.items()]
    points += [Point(8, fig(100.0, 15.0, 800.0), kv_cache_warning=True), Point(9, None)]
    r = row(lay, points, Target(ttft_ms=1000.0, tpot_ms=20.0))
    assert r.max_num_seqs == 6 and r.within is not None and r.within.figures.tpot_ms == 19.5
    assert r.holds_max == 7 and r.at_kv.oom
    assert row(lay, points, Target(ttft_ms=50.0)).within is None  # TTFT binds: nothing meets it
    assert row(lay, points, Target()).max_num_seqs == 7  # no SLO: the largest batch held


def test_batches_reach_the_kv_bound_but_search_no_higher_than_the_cap() -> None:
    assert batches(Layout(1, 1, 1, 3)) == [1, 2, 3]
    big = Layout(8, 1, 1, 1342)
    assert batches(big) == [*range(1, BATCH_CAP + 1), 1342]
    points = [Point(b, fig(100.0, 10.0, float(b))) for b in batches(big)]
    r = row(big, points, Target(tpot_ms=30.0))
    assert r.max_num_seqs == BATCH_CAP and r.at_kv.batch == 1342


def rows_for(*layouts_and_figures: tuple[Layout, Figures | None]) -> list[Row]:
    out = []
    for lay, figures in layouts_and_figures:
        points = [Point(lay.kv_max_seqs, figures)] if figures else [Point(lay.kv_max_seqs, None)]
        out.append(row(lay, points, Target(tpot_ms=30.0)))
    return out


def test_the_recommendation_is_the_most_tokens_per_gpu_within_the_slo() -> None:
    one, two, four = Layout(1, 1, 8, 100), Layout(2, 1, 4, 200), Layout(4, 1, 2, 400)
    rows = rows_for((one, fig(100, 29, 3000)), (two, fig(100, 25, 7000, 2)), (four, fig(100, 31, 20000, 4)))
    # Tensor 4 has the most tokens/s per GPU but misses the TPOT bound; tensor 2: 3,500 > 3,000.
    assert recommend(rows) is rows[1]
    # A tie goes to the smaller replica (a failure costs fewer GPUs' share).
    tied = rows_for((two, fig(100, 25, 6000, 2)), (one, fig(100, 25, 3000)))
    assert recommend(tied) is tied[1]
    assert recommend(rows_for((one, fig(100, 31, 3000)), (two, None))) is None


# ---- output: JSON shape, text, the serve command ------------------------------------------------

def injected(profile_name: str = "qwen3-4b-instruct-fp8", sets: list[str] | None = None) -> Forecast:
    profile = load_profile(profile_name, sets or [])
    one, two = Layout(1, 1, 2, 159), Layout(2, 1, 1, 328)
    rows = [row(one, [Point(114, fig(129.5, 29.9, 3800.5)), Point(159, fig(143.8, 34.6, 4573.2), True)],
                Target(1000.0, 30.0)),
            row(two, [Point(224, fig(132.3, 29.6, 7546.3, 2)), Point(328, None)], Target(1000.0, 30.0))]
    return Forecast(profile=profile, gpu=H100, gpus=2, workload=CHAT, target=Target(1000.0, 30.0),
                    source=aic.Source("0.12.0", profile.engine, "0.24.0", "h100_sxm"), engine_label="vLLM",
                    engine_version="0.32.0", rows=rows, excluded=[], recommended=recommend(rows), notes=["a note"])


def test_json_shape() -> None:
    out = as_json(injected(), "qwen3-4b-instruct-fp8", [])
    assert list(out) == ["profile", "gpu", "gpus", "workload", "slo", "source", "layouts", "recommended",
                         "excluded", "notes"]
    keys = ["tensor", "pipeline", "replicas", "max_num_seqs", "kv_max_seqs", "ttft_ms", "tpot_ms",
            "tokens_per_s_per_gpu", "tokens_per_s", "meets_slo", "aiconfigurator_max_seqs", "at_kv_max_seqs"]
    assert [list(layout) for layout in out["layouts"]] == [keys, keys]
    assert list(out["recommended"]) == [*keys, "command", "argv"]
    assert out["workload"] == {"input": 2000, "output": 1000}
    first = out["layouts"][0]
    # tokens_per_s is the whole layout's: replicas x one replica's.
    assert (first["max_num_seqs"], first["tokens_per_s_per_gpu"], first["tokens_per_s"]) == (114, 3800.5, 7601.0)
    assert first["at_kv_max_seqs"] == {"ttft_ms": 143.8, "tpot_ms": 34.6, "tokens_per_s_per_gpu": 4573.2,
                                       "tokens_per_s": 9146.4, "kv_cache_warning": True, "oom": False}
    assert out["layouts"][1]["at_kv_max_seqs"]["oom"] is True
    assert out["source"]["modelled"] is True and "not measured" in out["source"]["text"]
    json.dumps(out, allow_nan=False)


def test_text_marks_the_figures_as_modelled_and_prints_the_command() -> None:
    text = as_text(injected(), "qwen3-4b-instruct-fp8", [])
    assert ("source             modelled by aiconfigurator 0.12.0 with its vllm 0.24.0 data for h100_sxm, not "
            "measured; that data predates the vLLM 0.32.0 this kit runs") in text
    assert "159*" in text and "OOM" in text
    assert ("serve it           python -m deploy serve qwen3-4b-instruct-fp8 --replicas 2 --gpus 0,1 "
            "--set max_num_seqs=114") in text


def test_the_serve_command_keeps_the_users_sets_and_overrides_the_layouts_keys() -> None:
    f = injected(sets=["kv_cache_dtype=fp8"])
    sets = ["kv_cache_dtype=fp8", "max_num_seqs=7", "parallelism.tensor=4"]
    assert serve_argv(f, "qwen3-4b-instruct-fp8", sets, f.rows[1]) == [
        "python", "-m", "deploy", "serve", "qwen3-4b-instruct-fp8", "--replicas", "1", "--gpus", "0,1",
        "--set", "kv_cache_dtype=fp8", "--set", "max_num_seqs=224", "--set", "parallelism.tensor=2"]


def test_an_engine_serve_does_not_start_gets_its_render_command() -> None:
    f = injected("qwen3-4b-instruct-fp8-sglang")
    assert serve_argv(f, "qwen3-4b-instruct-fp8-sglang", [], f.rows[0]) == [
        "python", "-m", "deploy", "render", "qwen3-4b-instruct-fp8-sglang", "--set", "max_num_seqs=114"]
    assert "run 2 of them, each on its own 1 GPU (CUDA_VISIBLE_DEVICES)" in as_text(f, "x", [])


# ---- the profile's workload and SLO -------------------------------------------------------------

def test_workload_and_slo_are_typed_in_the_profile() -> None:
    profile = load_profile("qwq-32b")
    assert profile.workload == Workload(input=1000, output=8000)
    assert profile.slo is not None and (profile.slo.ttft_ms, profile.slo.tpot_ms) == (2000.0, 30.0)
    with pytest.raises(ProfileError, match=r"workload\.tokens: unknown key"):
        load_profile("qwq-32b", ["workload.tokens=5"])
    with pytest.raises(ProfileError, match="workload: 100000 \\+ 40000 tokens exceed max_model_len 131072"):
        load_profile("qwq-32b", ["workload={input: 100000, output: 40000}"])
    with pytest.raises(ProfileError, match="slo: a latency target needs the workload it is for"):
        load_profile("tiny-qwen3", ["slo={ttft_ms: 1000, tpot_ms: 30}"])
    with pytest.raises(ProfileError, match=r"slo\.tpot_ms: Input should be greater than 0"):
        load_profile("qwq-32b", ["slo.tpot_ms=0"])


# ---- refusals before the probe, and a missing venv ----------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    (["qwq-32b", "--gpu", "a10g", "--workload"],
     ("--gpu a10g: aiconfigurator 0.12.0 has no data for this GPU; the forecast covers h100-80gb (h100_sxm), "
      "h200 (h200_sxm), b200 (b200_sxm), a100-80gb (a100_sxm), l40s (l40s)")),
    (["qwq-32b", "--gpu", "h1000", "--workload"], "--gpu 'h1000' is not in configs/gpus.yaml; known: h100-80gb"),
    (["qwq-32b", "--gpu", "h100-80gb", "--workload", "100000:40000"],
     "--workload 100000:40000: 140,000 tokens exceed qwq-32b's max_model_len 131,072"),
    (["tiny-qwen3", "--gpu", "h100-80gb", "--workload"], "tiny-qwen3 declares no workload: give --workload IN:OUT"),
    (["tiny-qwen3", "--gpu", "h100-80gb", "--workload", "100:100"],
     "tiny-qwen3: device cpu: the forecast models NVIDIA GPUs"),
    (["qwq-32b", "--gpu", "h100-80gb", "--json"], "--json, --ttft-ms and --tpot-ms go with the forecast"),
    (["qwq-32b", "--gpu", "h100-80gb", "--gpus", "1", "--workload"],
     "qwq-32b: no layout of 1 x h100-80gb serves it (tensor 1 x pipeline 1: does not fit"),
    (["qwq-32b", "--gpu", "h100-80gb", "--workload", "--set", "quantization=fp8"],
     "quantization fp8: aiconfigurator models the checkpoint's own quantization (config.json: none)"),
])
def test_refused_before_aiconfigurator_runs(capsys: pytest.CaptureFixture[str], argv: list[str],
                                           expected: str) -> None:
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err


@pytest.mark.parametrize("workload", ["2000", "a:b", "0:100", "100:1", "2000:1000:5"])
def test_a_malformed_workload_is_an_argument_error(capsys: pytest.CaptureFixture[str], workload: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["plan", "qwq-32b", "--gpu", "h100-80gb", "--workload", workload])
    assert exited.value.code == 2
    assert f"argument --workload: '{workload}': expected IN:OUT tokens per request" in capsys.readouterr().err


def test_a_missing_venv_says_how_to_make_it(tmp_path: Path) -> None:
    prepared = prepare(load_profile("qwq-32b"), H100, 2, REASONING, GPU_TYPES)
    with pytest.raises(DeployError) as missing:
        aic.estimate([prepared.job], python=tmp_path / "bin" / "python")
    assert "the forecast venv is missing" in str(missing.value) and "run `make forecast-venv`" in str(missing.value)
    assert "Linux x86-64 only" not in aic.missing_venv(tmp_path, "Linux", "x86_64")
    assert ("aiconfigurator's core wheel exists for Linux x86-64 only, so it cannot be installed on this Darwin "
            "arm64") in aic.missing_venv(tmp_path, "Darwin", "arm64")


def test_plan_without_a_workload_is_the_memory_plan_as_before() -> None:
    """The memory plan's output is unchanged for profiles that now declare a workload."""
    result = subprocess.run([sys.executable, "-m", "deploy", "plan", "qwq-32b", "--gpu", "h100-80gb"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("profile            qwq-32b\n")
    assert "forecast" not in result.stdout and result.stderr == ""


def test_kv_cache_modes_follow_the_profile_not_aiconfigurators_guess() -> None:
    assert aic.kvcache_mode("auto", "bfloat16") == "bfloat16"  # aiconfigurator would guess fp8 for an FP8 checkpoint
    assert [aic.kvcache_mode(d, "bfloat16") for d in ("fp8", "fp8_e4m3", "fp8_e5m2")] == ["fp8"] * 3
    with pytest.raises(DeployError, match="aiconfigurator models bfloat16 and fp8 KV caches only"):
        aic.kvcache_mode("auto", "float32")
