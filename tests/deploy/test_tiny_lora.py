"""The tiny model's LoRA adapter: generated locally by peft, deterministic, and not a no-op."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from deploy.launch import ensure_adapters
from deploy.loader import load_profile
from deploy.tiny.lora import GENERATOR_STAMP, RANK, generate


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_deterministic(tmp_path: Path, tiny_model_dir: Path, tiny_lora_dir: Path) -> None:
    assert digest(generate(tmp_path / "tiny-lora", base=tiny_model_dir)) == digest(tiny_lora_dir)


def test_adapter_config_as_vllm_and_the_profile_read_it(tiny_lora_dir: Path) -> None:
    config = json.loads((tiny_lora_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("LORA", RANK, ["q_proj", "v_proj"])
    # The profile's own name for the base (repo-relative), which `deploy` compares with `model`.
    assert config["base_model_name_or_path"] == load_profile("tiny-qwen3-lora").model == ".cache/models/tiny-qwen3"
    assert load_profile("tiny-qwen3-lora").lora.max_rank >= config["r"]  # type: ignore[union-attr]


def test_b_is_not_zero(tiny_lora_dir: Path) -> None:
    """peft zero-initialises lora_B (an untrained adapter is a no-op); this one is filled."""
    weights = load_file(tiny_lora_dir / "adapter_model.safetensors")
    b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert len(b) == 2 * 2  # q_proj and v_proj in both layers
    assert all(w.float().std() > 0.1 for w in b.values())  # seeded normal, std 0.5


def test_the_adapter_changes_the_models_logits(tiny_model_dir: Path, tiny_lora_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, tiny_lora_dir)
        after = adapted(ids).logits
        with adapted.disable_adapter():
            disabled = adapted(ids).logits
    assert torch.equal(disabled, before)
    # About as large as the logits themselves (std ~0.23: near-uniform over 2,048 tokens).
    assert (after - before).abs().mean() > 0.1


def test_an_adapter_from_an_older_generator_is_made_again(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = generate(tmp_path / "tiny-lora", base=tiny_model_dir)
    (out / GENERATOR_STAMP).write_text("an older generator")
    (out / "adapter_config.json").write_text("{}")
    generate(out, base=tiny_model_dir)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == RANK


def test_the_launcher_generates_a_missing_tiny_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "tiny-lora"
    profile = load_profile("tiny-qwen3-lora", [
        f"lora.adapters=[{{name: tiny-lora, source: '{out}', generator: tiny-lora}}]"])
    ensure_adapters(profile)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
