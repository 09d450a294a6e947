"""LoRA adapters in profiles: the schema, the refusals (rank, base model, names), rendering and the
memory plan. No vLLM needed here; what vLLM's own code says is in test_lora_check.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.adapters import same_model
from deploy.errors import LaunchError, ProfileError
from deploy.launch import ensure_adapters
from deploy.loader import load_profile
from deploy.memory_plan import load_gpu_types, plan_memory, read_shape
from deploy.paths import REPO_ROOT
from deploy.render import engine_args

PROFILES = Path(__file__).parent / "profiles"
QWEN3_LORA = PROFILES / "qwen3-4b-instruct-fp8-lora.yaml"
H100 = load_gpu_types()["h100-80gb"]


def adapter_dir(tmp_path: Path, **config: Any) -> Path:
    """A local adapter directory holding only adapter_config.json (what the checks read)."""
    out = tmp_path / "adapter"
    out.mkdir(exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 16, **config}))
    return out


def with_adapter(path: Path | str, max_rank: int = 16) -> list[str]:
    return [f"lora={{max_rank: {max_rank}, adapters: [{{name: extra, source: '{path}'}}]}}"]


def refusal(profile: str, overrides: list[str]) -> str:
    with pytest.raises(ProfileError) as err:
        load_profile(profile, overrides)
    return str(err.value)


# ---- schema ---------------------------------------------------------------------------------

def test_tiny_lora_profile_as_typed() -> None:
    profile = load_profile("tiny-qwen3-lora")
    assert profile.lora is not None
    assert (profile.lora.max_rank, profile.lora.max_loras, profile.lora.max_cpu_loras) == (8, 1, 2)
    (adapter,) = profile.lora.adapters
    assert (adapter.name, adapter.source, adapter.generator) == ("tiny-lora", ".cache/models/tiny-lora", "tiny-lora")
    assert adapter.path == REPO_ROOT / ".cache/models/tiny-lora"
    assert profile.adapter_names == ["tiny-lora"]
    assert load_profile("tiny-qwen3").lora is None and load_profile("tiny-qwen3").adapter_names == []


def test_adapter_sampling_preset_and_fallback_to_the_base() -> None:
    profile = load_profile(QWEN3_LORA)
    support = profile.sampling_for("qwen3-4b-support")
    assert support.defaults.temperature == 0.3 and support.defaults.max_tokens == 2048
    assert profile.sampling_for("qwen3-4b-sql") == profile.sampling  # no preset: the base's
    assert profile.sampling_for("qwen3-4b-instruct") == profile.sampling


def test_hub_and_local_sources() -> None:
    profile = load_profile(QWEN3_LORA)
    assert profile.lora is not None
    local, hub = profile.lora.adapters
    assert local.path == REPO_ROOT / "tests/deploy/adapters/qwen3-4b-instruct-support"
    assert hub.path is None


def test_max_rank_must_be_one_vllm_accepts() -> None:
    message = refusal("tiny-qwen3-lora", ["lora.max_rank=24"])
    assert "lora.max_rank: Input should be 1, 8, 16, 32, 64, 128, 256, 320 or 512 (got 24)" in message


def test_max_cpu_loras_below_max_loras() -> None:
    message = refusal("tiny-qwen3-lora", ["lora.max_loras=4", "lora.max_cpu_loras=2"])
    assert "lora: max_cpu_loras 2 is below max_loras 4" in message


def test_unknown_lora_key() -> None:
    assert "lora.max_ranks: unknown key" in refusal("tiny-qwen3-lora", ["lora.max_ranks=8"])


def test_adapter_needs_adapters() -> None:
    assert "lora.adapters: List should have at least 1 item" in refusal("tiny-qwen3", ["lora={adapters: []}"])


def test_duplicate_adapter_names() -> None:
    message = refusal("tiny-qwen3", ["lora={adapters: [{name: a, source: org/a}, {name: a, source: org/b}]}"])
    assert "adapters repeat the name(s) a" in message and "configs/models/tiny-qwen3.yaml" in message


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny"])
def test_adapter_name_clashing_with_the_base_names(name: str) -> None:
    message = refusal("tiny-qwen3", [f"lora={{adapters: [{{name: {name}, source: org/a}}]}}"])
    assert f"lora.adapters[0].name {name!r} is already the profile's served_model_name or an alias" in message


def test_adapter_name_pattern() -> None:
    assert "lora.adapters[0].name: String should match pattern" in refusal(
        "tiny-qwen3", ["lora={adapters: [{name: Tiny_LoRA, source: org/a}]}"])


def test_source_neither_hub_id_nor_path() -> None:
    message = refusal("tiny-qwen3", ["lora={adapters: [{name: a, source: adapters/a/b}]}"])
    assert "neither a hub id (org/name) nor a local directory: write a directory inside the repository as " \
           "./adapters/a/b" in message


def test_lora_flags_are_not_engine_args() -> None:
    message = refusal("tiny-qwen3", ["engine_args={max-lora-rank: 64}"])
    assert ("engine: vllm: engine_args.max-lora-rank: --max-lora-rank is rendered from the profile's lora.max_rank: "
            "set lora.max_rank instead") in message


def test_tiny_lora_generator_needs_the_tiny_model() -> None:
    message = refusal("qwen3-4b-instruct-fp8", [
        "lora={adapters: [{name: a, source: .cache/models/tiny-lora, generator: tiny-lora}]}"])
    assert "lora.adapters[0].generator: tiny-lora is made for the tiny model" in message


def test_adapter_preset_max_tokens_must_fit_the_context() -> None:
    preset = "lora.adapters=[{name: tiny-lora, source: org/a, sampling: {defaults: {max_tokens: 4096}}}]"
    message = refusal("tiny-qwen3-lora", [preset])
    assert "lora.adapters[0].sampling.defaults.max_tokens (tiny-lora) 4096 exceeds max_model_len 2048" in message


# ---- refusals from the adapter's own adapter_config.json ----------------------------------

def test_rank_above_max_rank(tmp_path: Path) -> None:
    path = adapter_dir(tmp_path, r=32, base_model_name_or_path="Qwen/Qwen3-4B-Instruct-2507")
    message = refusal("qwen3-4b-instruct-fp8", with_adapter(path, max_rank=16))
    assert "configs/models/qwen3-4b-instruct-fp8.yaml (with --set lora=" in message
    assert (f"lora.adapters[0].source (extra): {path}/adapter_config.json has rank 32 (r / rank_pattern), "
            "above lora.max_rank 16: vLLM would refuse to load it; set lora.max_rank to 32") in message
    load_profile("qwen3-4b-instruct-fp8", with_adapter(path, max_rank=32))  # the fix works


def test_rank_pattern_counts(tmp_path: Path) -> None:
    path = adapter_dir(tmp_path, r=8, rank_pattern={"o_proj": 64})
    assert "has rank 64 (r / rank_pattern), above lora.max_rank 16: vLLM would refuse to load it; " \
           "set lora.max_rank to 64" in refusal("qwen3-4b-instruct-fp8", with_adapter(path))


def test_rank_beyond_what_vllm_serves(tmp_path: Path) -> None:
    path = adapter_dir(tmp_path, r=1024)
    assert "vLLM serves ranks up to 512: use an adapter of lower rank" in refusal(
        "qwen3-4b-instruct-fp8", with_adapter(path, max_rank=512))


def test_adapter_config_without_rank(tmp_path: Path) -> None:
    path = adapter_dir(tmp_path)
    assert "adapter_config.json has no rank `r`" in refusal("qwen3-4b-instruct-fp8", with_adapter(path))


def test_adapter_config_not_json(tmp_path: Path) -> None:
    path = adapter_dir(tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json: not a readable adapter config" in refusal("qwen3-4b-instruct-fp8", with_adapter(path))


def test_adapter_trained_on_another_model(tmp_path: Path) -> None:
    path = adapter_dir(tmp_path, r=16, base_model_name_or_path="Qwen/Qwen3-4B-Thinking-2507")
    message = refusal("qwen3-4b-instruct-fp8", with_adapter(path))
    assert (f"lora.adapters[0].source (extra): {path}/adapter_config.json says the adapter was trained on "
            "'Qwen/Qwen3-4B-Thinking-2507' (base_model_name_or_path) but this profile serves model "
            "'Qwen/Qwen3-4B-Instruct-2507-FP8'") in message
    assert "serve it from a profile of 'Qwen/Qwen3-4B-Thinking-2507'" in message


def test_tiny_adapter_on_a_hub_model_is_refused(tiny_lora_dir: Path) -> None:
    message = refusal("qwq-32b", with_adapter(tiny_lora_dir, max_rank=8))
    assert "trained on '.cache/models/tiny-qwen3' (base_model_name_or_path) but this profile serves model " \
           "'Qwen/QwQ-32B'" in message


def test_missing_local_adapter_is_left_to_serve_and_check(tmp_path: Path) -> None:
    """Not on disk yet (made later, mounted on the GPU box): render works, serve refuses."""
    profile = load_profile("qwen3-4b-instruct-fp8", with_adapter(tmp_path / "absent"))
    assert any("absent" in arg for arg in engine_args(profile))
    with pytest.raises(LaunchError, match=r"lora.adapters\[0\].source: no adapter at .*absent \(no adapter_config"):
        ensure_adapters(profile)


@pytest.mark.parametrize(("trained_on", "served"), [
    ("Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-4B-Instruct-2507"),
    ("qwen/qwen3-4b-instruct-2507", "Qwen/Qwen3-4B-Instruct-2507"),       # hub ids ignore case
    ("Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-4B-Instruct-2507-FP8"),   # trained on bf16, served in FP8
    ("Qwen/QwQ-32B", "Qwen/QwQ-32B-AWQ"),
    ("Qwen/QwQ-32B", "/models/QwQ-32B"),                                   # a downloaded copy
    ("/root/.cache/huggingface/hub/models--Qwen--QwQ-32B/snapshots/abc123", "Qwen/QwQ-32B"),
    (".cache/models/tiny-qwen3", ".cache/models/tiny-qwen3"),
    (str(REPO_ROOT / ".cache/models/tiny-qwen3"), ".cache/models/tiny-qwen3"),  # absolute vs repo-relative
])
def test_same_model(trained_on: str, served: str) -> None:
    assert same_model(trained_on, served)


@pytest.mark.parametrize(("trained_on", "served"), [
    ("Qwen/Qwen3-4B-Thinking-2507", "Qwen/Qwen3-4B-Instruct-2507-FP8"),
    ("Qwen/Qwen3-4B", "Qwen/Qwen3-4B-Instruct-2507"),
    ("someone/QwQ-32B", "Qwen/QwQ-32B"),                                   # another organisation's model
    ("Qwen/Qwen2.5-32B-Instruct", "Qwen/QwQ-32B"),
    (".cache/models/tiny-qwen3", "Qwen/QwQ-32B"),
    ("/models/other", ".cache/models/tiny-qwen3"),
    ("/root/.cache/huggingface/hub/models--Qwen--QwQ-32B/snapshots/abc123", "Qwen/Qwen3-4B-Instruct-2507"),
])
def test_not_same_model(trained_on: str, served: str) -> None:
    assert not same_model(trained_on, served)


# ---- render ---------------------------------------------------------------------------------

def test_render_lora_flags() -> None:
    args = engine_args(load_profile("tiny-qwen3-lora"))
    start = args.index("--enable-lora")
    assert args[start:start + 8] == ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "1",
                                     "--max-cpu-loras", "2", "--lora-modules"]
    assert json.loads(args[start + 8]) == {"name": "tiny-lora", "path": str(REPO_ROOT / ".cache/models/tiny-lora"),
                                           "base_model_name": "tiny-qwen3"}
    assert args[start + 9].startswith("--")  # one module: the next flag follows


def test_render_hub_adapter_as_is_and_no_cpu_cache_flag_by_default() -> None:
    args = engine_args(load_profile("qwq-32b", ["lora={adapters: [{name: math, source: org/qwq-math-lora}]}"]))
    assert "--max-cpu-loras" not in args
    assert args[args.index("--max-lora-rank") + 1] == "16" and args[args.index("--max-loras") + 1] == "1"
    module = json.loads(args[args.index("--lora-modules") + 1])
    assert module == {"name": "math", "path": "org/qwq-math-lora", "base_model_name": "qwq-32b"}


def test_no_lora_no_flags() -> None:
    assert not any("lora" in arg for arg in engine_args(load_profile("tiny-qwen3")))


def test_dry_run_shows_the_lora_argv() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "serve", "tiny-qwen3-lora", "--port", "8199", "--dry-run", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    argv = json.loads(result.stdout)["replicas"][0]["argv"]
    assert "--enable-lora" in argv and json.loads(argv[argv.index("--lora-modules") + 1])["name"] == "tiny-lora"


# ---- memory plan ------------------------------------------------------------------------------

def test_plan_counts_what_vllm_allocates_for_the_tiny_model() -> None:
    """vLLM 0.32 CPU, tiny model, measured: the lora_a/lora_b tensors of every LoRA-wrapped layer
    (embed_tokens, qkv_proj, o_proj, gate_up_proj, down_proj, the logits processor) summed to
    135,168 bytes at rank 8 x 1 slot and 540,672 at rank 16 x 2 slots."""
    one = plan_memory(load_profile("tiny-qwen3-lora"), H100, 1)
    assert (one.lora_rank, one.lora_slots, one.lora_bytes_per_gpu) == (8, 1, 135_168)
    two = plan_memory(load_profile("tiny-qwen3-lora", ["lora.max_rank=16", "lora.max_loras=2"]), H100, 1)
    assert two.lora_bytes_per_gpu == 540_672


def test_plan_qwen3_4b_slot_arithmetic() -> None:
    """Qwen3-4B, rank 16, bf16: per layer q/k/v in 3 x 2560 + out 4096 + 2 x 1024, o 4096 + 2560,
    gate/up 2 x 2560 + 2 x 9728, down 9728 + 2560 = 57,344; x 36 layers, + embeddings and LM head
    2 x (151,936 + 2,560); x rank 16 x 2 bytes."""
    profile = load_profile(QWEN3_LORA)
    plan = plan_memory(profile, H100, 1)
    per_slot = (57_344 * 36 + 2 * (151_936 + 2_560)) * 16 * 2
    assert plan.lora_bytes_per_slot_per_gpu == per_slot == 75_948_032
    assert plan.lora_bytes_per_gpu == 2 * per_slot  # max_loras: 2
    without = plan_memory(load_profile("qwen3-4b-instruct-fp8"), H100, 1)
    assert without.kv_space_per_gpu - plan.kv_space_per_gpu == 2 * per_slot


def test_plan_lora_split_across_tensor_ranks() -> None:
    shape = read_shape(load_profile(QWEN3_LORA))
    whole, split = shape.lora_elements_per_slot(16), shape.lora_elements_per_slot(16, tensor=2)
    # B of q/k/v and gate/up, A of o and down halve; the replicated halves and embeddings do not.
    halved = 36 * ((4096 + 2048) // 2 + 2 * 9728 // 2 + 4096 // 2 + 9728 // 2) * 16
    assert whole - split == halved


def test_plan_output_names_the_lora_share() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "plan", str(QWEN3_LORA), "--gpu", "h100-80gb"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert "lora adapters      144.9 MiB per GPU: 2 slot(s) (max_loras) x 72.4 MiB (rank 16" in result.stdout
    assert "(usable - weights - lora adapters - 2.0 GiB" in result.stdout
