"""`engine: sglang`: the profile maps onto SGLang's launch_server flags, and every setting SGLang
has no equivalent for is refused at load with file, key and fix. No SGLang venv needed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.chart import CHART_PORT, chart_block
from deploy.engines.sglang import Sglang
from deploy.engines.sglang_check import REQUIREMENTS, effective_values, pinned_version
from deploy.errors import CheckError, LaunchError, ProfileError
from deploy.launch import prepare
from deploy.loader import load_profile
from deploy.memory_plan import GIB, format_plan, load_gpu_types, plan_memory, smallest_fit
from deploy.paths import REPO_ROOT
from deploy.render import engine_args, server_command

QWQ = "qwq-32b-sglang"
INSTRUCT = "qwen3-4b-instruct-fp8-sglang"
THINKING = "qwen3-4b-thinking-fp8-sglang"


def value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, flag
    return args[args.index(flag) + 1]


def test_server_command_is_sglangs_launch_server() -> None:
    command = server_command(load_profile(INSTRUCT), port=9123, python="python3")
    assert command.argv[:3] == ["python3", "-m", "sglang.launch_server"]
    args = command.argv[3:]
    assert value(args, "--model-path") == "Qwen/Qwen3-4B-Instruct-2507-FP8"
    assert (value(args, "--host"), value(args, "--port")) == ("0.0.0.0", "9123")
    assert value(args, "--served-model-name") == "qwen3-4b-instruct-sglang"  # one name; aliases are the proxy's
    assert value(args, "--context-length") == "262144"
    assert (value(args, "--tp-size"), value(args, "--pp-size")) == ("1", "1")
    assert value(args, "--mem-fraction-static") == "0.85"
    assert value(args, "--max-running-requests") == "139"  # the profile's max_num_seqs
    assert value(args, "--chunked-prefill-size") == "8192"
    assert value(args, "--tool-call-parser") == "hermes"
    assert "--enable-metrics" in args
    assert args[-3:] == ["--uvicorn-access-log-exclude-prefixes", "/health", "/metrics"]
    for vllm_only in ("--enable-auto-tool-choice", "--max-model-len", "--gpu-memory-utilization",
                      "--enable-prefix-caching", "--disable-radix-cache", "--json-model-override-args"):
        assert vllm_only not in args


def test_yarn_goes_into_json_model_override_args_with_rope_type_and_max_positions() -> None:
    args = engine_args(load_profile(QWQ))
    assert json.loads(value(args, "--json-model-override-args")) == {
        "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                         "rope_theta": 1000000.0},
    }
    shorter = engine_args(load_profile(QWQ, ["max_model_len=65536"]))
    assert json.loads(value(shorter, "--json-model-override-args"))["max_position_embeddings"] == 65536
    assert value(shorter, "--context-length") == "65536"


def test_parser_names_are_sglangs() -> None:
    args = engine_args(load_profile(QWQ))
    assert value(args, "--reasoning-parser") == "deepseek-r1"  # vLLM's deepseek_r1
    assert value(engine_args(load_profile(THINKING)), "--reasoning-parser") == "qwen3-thinking"
    mapped = engine_args(load_profile(INSTRUCT, ["tool_call_parser=llama3_json"]))
    assert value(mapped, "--tool-call-parser") == "llama3"


def test_switches_map_to_sglangs_flags() -> None:
    args = engine_args(load_profile(INSTRUCT, [
        "kv_cache_dtype=fp8", "enable_prefix_caching=false", "enable_chunked_prefill=false",
        "max_num_batched_tokens=null", "enforce_eager=true", "quantization=fp8", "parallelism.pipeline=2",
        "access_log_exclude=[]", "engine_args={random-seed: 7, enable-cache-report: true, log-requests: false}",
    ]))
    assert value(args, "--kv-cache-dtype") == "fp8_e4m3"  # vLLM's fp8 is e4m3; SGLang has no plain fp8
    assert value(args, "--chunked-prefill-size") == "-1"
    assert "--disable-radix-cache" in args
    assert value(args, "--cuda-graph-backend-decode") == value(args, "--cuda-graph-backend-prefill") == "disabled"
    assert value(args, "--quantization") == "fp8"
    assert value(args, "--pp-size") == "2"
    assert "--uvicorn-access-log-exclude-prefixes" not in args
    assert args[-3:] == ["--random-seed", "7", "--enable-cache-report"]
    assert "--log-requests" not in args


def test_lora_counts_the_base_model_in_sglangs_batch() -> None:
    profile = load_profile(INSTRUCT, [
        ("lora={max_rank: 32, max_loras: 2, max_cpu_loras: 2, adapters: "
        "[{name: support, source: ./tests/deploy/adapters/qwen3-4b-instruct-support}, {name: math, source: org/math}]}"),
    ])
    args = engine_args(profile)
    assert "--enable-lora" in args
    assert value(args, "--max-lora-rank") == "32"
    assert value(args, "--max-loras-per-batch") == "3"  # 2 adapters + the base model
    assert value(args, "--max-loaded-loras") == "3"  # SGLang needs >= max-loras-per-batch
    start = args.index("--lora-paths") + 1
    assert [json.loads(a) for a in args[start:start + 2]] == [
        {"lora_name": "support", "lora_path": str(REPO_ROOT / "tests/deploy/adapters/qwen3-4b-instruct-support")},
        {"lora_name": "math", "lora_path": "org/math"},
    ]


REFUSALS = [
    (["device=cpu"], "device: engine sglang serves on NVIDIA GPUs only"),
    (["parallelism.executor=ray"], "parallelism.executor: ray is vLLM's Ray executor"),
    (["parallelism.gpus_per_node=4"], "parallelism.gpus_per_node: SGLang has no such setting"),
    (["enable_auto_tool_choice=false"], "enable_auto_tool_choice: false, but SGLang answers tool_choice auto"),
    (["enable_chunked_prefill=false"], "max_num_batched_tokens: SGLang's equivalent is the prefill chunk size"),
    (["env={VLLM_USE_V1: '1'}"], "env.VLLM_USE_V1: a vLLM variable, SGLang ignores it"),
    (["engine_args={max-num-seqs: 8}"], ("engine_args.max-num-seqs: --max-num-seqs is vLLM's flag for the profile's "
                                        "max_num_seqs, which renders SGLang's own: set max_num_seqs instead")),
    (["engine_args={context-length: 8192}"], ("engine_args.context-length: --context-length is rendered from the "
                                             "profile's max_model_len: set max_model_len instead")),
    (["engine_args={enable-metrics: true}"], ("engine_args.enable-metrics: SGLang always gets --enable-metrics (the "
                                             "chart and the benchmarks scrape SGLang's metrics): remove it")),
    (["engine_args={device: cpu}"], "engine_args.device: "),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSALS, ids=[r[0][0].split("=")[0] for r in REFUSALS])
def test_settings_sglang_cannot_honour_are_refused_with_file_and_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(INSTRUCT, overrides)
    text = str(err.value)
    assert text.startswith(f"configs/models/{INSTRUCT}.yaml (with --set "), text
    assert "engine: sglang: " in text and message in text, text


def test_the_same_settings_stay_valid_for_vllm() -> None:
    for overrides, _ in REFUSALS[:6]:
        if overrides[0].startswith("parallelism.gpus_per_node"):
            overrides = [*overrides, "parallelism.executor=ray"]
        assert load_profile("qwen3-4b-instruct-fp8", overrides).engine == "vllm"


def test_every_refusal_is_reported_at_once() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(QWQ, ["parallelism.executor=ray", "device=cpu"])
    assert "parallelism.executor" in str(err.value) and "device:" in str(err.value)


def test_the_pinned_version_is_read_from_the_requirements_file() -> None:
    pins = [line for line in REQUIREMENTS.read_text().splitlines() if line.startswith("sglang==")]
    assert pins == [f"sglang=={pinned_version()}"]


def test_check_without_the_sglang_venv_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(CheckError) as err:
        Sglang(python=tmp_path / "bin" / "python").check(load_profile(INSTRUCT))
    assert str(err.value).startswith(f"{INSTRUCT}: the SGLang validation venv is missing")
    assert "run `make sglang-venv`" in str(err.value)


def _probe_answer(rotary_class: str, positions: int, theta: float = 1000000.0) -> dict[str, object]:
    """The shape deploy/engines/sglang_probe.py prints (its keys; the values a YaRN override that did
    not take would give)."""
    return {
        "ok": True, "sglang_version": pinned_version(),
        "server_args": {"tp_size": 2, "pp_size": 1, "kv_cache_dtype": "auto"},
        "model_config": {"context_len": 131072, "max_position_embeddings": 131072, "dtype": "bfloat16",
                         "quantization": None},
        "rope": {"rope_theta": theta, "rope_parameters": {"rope_type": "default"},
                 "rotary_embedding": {"class": rotary_class, "cos_sin_cache_positions": positions}},
    }


def test_check_fails_when_sglang_would_not_build_a_yarn_embedding() -> None:
    profile = load_profile(QWQ)
    assert profile.config_dir is not None
    with pytest.raises(CheckError, match=r"rope_scaling: SGLang would build RotaryEmbedding with 131072 positions"):
        effective_values(profile, _probe_answer("RotaryEmbedding", 131072), profile.config_dir)
    with pytest.raises(CheckError, match=r"rope_scaling.rope_theta: SGLang would use 10000.0 .* has 1000000.0"):
        effective_values(profile, _probe_answer("YaRNScalingRotaryEmbedding", 131072, 10000.0),
                             profile.config_dir)


def test_serve_refuses_sglang_before_starting_anything() -> None:
    with pytest.raises(LaunchError) as err:
        prepare(load_profile(INSTRUCT), dry_run=True)
    text = str(err.value)
    assert "serve` starts vLLM only" in text and "needs an NVIDIA GPU" in text
    assert f"python -m deploy render {INSTRUCT}" in text and f"--backend {INSTRUCT}=http://" in text
    result = subprocess.run([sys.executable, "-m", "deploy", "serve", INSTRUCT, "--proxy-port", "8000"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {INSTRUCT}: engine: sglang:") and "Traceback" not in result.stderr


def test_chart_block_carries_the_engine_and_sglangs_argv() -> None:
    profile = load_profile(QWQ)
    block = chart_block(profile)
    assert (block["engine"], block["serverModule"]) == ("sglang", "sglang.launch_server")
    assert block["args"] == engine_args(profile.model_copy(update={"port": CHART_PORT}))
    assert block["profile"]["engine"] == "sglang"
    assert (block["tensor"], block["worldSize"], block["executor"]) == (2, 2, "mp")
    assert chart_block(load_profile("qwq-32b"))["engine"] == "vllm"


def test_plan_counts_sglangs_budget_weights_and_kv_only() -> None:
    gpu = load_gpu_types()["h100-80gb"]
    sglang = plan_memory(load_profile(QWQ), gpu, 2)
    vllm = plan_memory(load_profile("qwq-32b", ["gpu_memory_utilization=0.85"]), gpu, 2)
    assert sglang.usable_bytes_per_gpu == vllm.usable_bytes_per_gpu
    # The activations allowance is outside SGLang's --mem-fraction-static, inside vLLM's budget.
    assert sglang.kv_space_per_gpu - vllm.kv_space_per_gpu == int(vllm.overhead_gib * GIB)
    assert "kv space per GPU   37.1 GiB (usable - weights)\n" in format_plan(sglang, None)
    lora = ["lora={max_loras: 2, adapters: [{name: math, source: org/math}]}"]
    assert plan_memory(load_profile(INSTRUCT, lora), gpu, 1).lora_slots == 3  # + the base model's slot
    assert plan_memory(load_profile("qwen3-4b-instruct-fp8", lora), gpu, 1).lora_slots == 2


def test_plan_verdict_counts_what_sglangs_fraction_leaves_for_activations() -> None:
    """SGLang's activations and CUDA graphs live outside --mem-fraction-static: at 0.98 of an
    80 GiB GPU 1.6 GiB is left for a 2 GiB estimate, which does not fit however roomy the KV is."""
    a100 = load_gpu_types()["a100-80gb"]
    assert a100.memory_gib == 80.0
    tight = plan_memory(load_profile(INSTRUCT, ["gpu_memory_utilization=0.98"]), a100, 1)
    assert tight.kv_fits and tight.full_sequences >= 2 and not tight.activations_fit and not tight.fits
    text = format_plan(tight, None)
    assert "1.6 GiB left for activations/graphs, 2.0 GiB estimated" in text
    assert text.endswith(
        "verdict            DOES NOT FIT the 2.0 GiB activations/graphs estimate: gpu_memory_utilization 0.98 "
        "(SGLang's --mem-fraction-static) leaves 1.6 GiB per GPU outside it; lower gpu_memory_utilization to 0.97 "
        "or less (or pass --overhead-gib with what you measured)")
    assert plan_memory(load_profile(INSTRUCT, ["gpu_memory_utilization=0.97"]), a100, 1).fits  # the advice works
    assert plan_memory(load_profile(INSTRUCT, ["gpu_memory_utilization=0.98"]), a100, 1, overhead_gib=1.5).fits
    # vLLM takes the allowance out of its own budget: the same fraction fits there.
    assert plan_memory(load_profile("qwen3-4b-instruct-fp8", ["gpu_memory_utilization=0.98"]), a100, 1).fits


def test_plan_names_both_shortfalls_and_the_smallest_count_for_the_kv() -> None:
    l4 = load_gpu_types()["l4"]
    plan = plan_memory(load_profile(QWQ, ["gpu_memory_utilization=0.95"]), l4, 1, tensor=1)
    assert not plan.kv_fits and not plan.activations_fit
    verdict = format_plan(plan, smallest_fit(load_profile(QWQ, ["gpu_memory_utilization=0.95"]), l4)).splitlines()[-1]
    assert verdict.startswith("verdict            DOES NOT FIT one 131,072-token sequence: the smallest that fits is ")
    assert "; nor the 2.0 GiB activations/graphs estimate: gpu_memory_utilization 0.95 " in verdict


def test_cli_plan_exits_1_when_the_activations_do_not_fit() -> None:
    result = subprocess.run([sys.executable, "-m", "deploy", "plan", INSTRUCT, "--gpu", "a100-80gb", "--set",
                             "gpu_memory_utilization=0.98"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DOES NOT FIT the 2.0 GiB activations/graphs estimate" in result.stdout
