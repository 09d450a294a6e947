"""Generate a LoRA adapter for the tiny model locally with peft: no download, deterministic.

peft writes the adapter exactly as fine-tuning tools do (adapter_config.json and
adapter_model.safetensors with peft's tensor names), so vLLM loads it through the same code
as a real Qwen adapter. peft initialises lora_B to zero (an untrained adapter changes
nothing); here B is filled from a seeded generator so the adapter visibly changes outputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from deploy.paths import GENERATED_MODELS_DIR, REPO_ROOT
from deploy.tiny import model as tiny_model

RANK = 8
ALPHA = 16
# Attention projections vLLM wraps for Qwen3 (q/k/v are packed into qkv_proj there).
TARGET_MODULES = ["q_proj", "v_proj"]
SEED = 4321
# Spread of lora_B: the delta B @ A x (alpha / r) is then about as large as the base weights'
# contribution, enough to move the tiny model's sampled tokens.
B_STD = 0.5
BASE_MODEL = GENERATED_MODELS_DIR / "tiny-qwen3"
GENERATOR_STAMP = tiny_model.GENERATOR_STAMP


def _generator_digest() -> str:
    """This file's source and the base model's generator: either changing makes it again."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(tiny_model._generator_digest().encode())  # the base it is made for
    return digest.hexdigest()


def _portable(path: Path) -> str:
    """The base model as the profile names it (relative to the repository when inside it)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def build_adapter(out: Path, base: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars for a 2-layer model are noise
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * B_STD)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    # peft writes the absolute path it loaded the base from; the profile's own name for it is
    # what `deploy` compares with the profile's model (and what stays true when the repo moves).
    adapter_config["base_model_name_or_path"] = _portable(base)
    # peft keeps target_modules in a set: its order changes with Python's string hashing.
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # peft's model card template: noise, and dated


def is_current(out: Path) -> bool:
    stamp = out / GENERATOR_STAMP
    return (out / "adapter_config.json").is_file() and stamp.is_file() and stamp.read_text() == _generator_digest()


def generate(out: Path, base: Path = BASE_MODEL, force: bool = False) -> Path:
    """Write the adapter into `out` atomically; the base tiny model is generated first if needed."""
    if is_current(out) and not force:
        return out
    tiny_model.generate(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp) / out.name
        build_adapter(staging, base)
        (staging / GENERATOR_STAMP).write_text(_generator_digest())
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return out
