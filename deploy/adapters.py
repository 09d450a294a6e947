"""What a LoRA adapter's own adapter_config.json says, held against the profile that serves it.

Read when the adapter is on disk (a local directory, the generated tiny adapter once made):
its rank must fit `lora.max_rank` (vLLM sizes every slot for it and refuses larger adapters
only when a request first loads them), and the model it was trained on
(`base_model_name_or_path`) must be the profile's model. A hub adapter is checked by vLLM
when it downloads it; a local directory not made yet is checked once it exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from deploy.errors import ProfileError
from deploy.paths import is_hub_id, is_local, local_dir, shown
from deploy.profile import MAX_LORA_RANKS, Adapter, Profile

ADAPTER_CONFIG = "adapter_config.json"
# Quantized releases of a model keep its name plus a suffix (Qwen3-4B-Instruct-2507-FP8,
# QwQ-32B-AWQ, ...-GPTQ-Int4): an adapter trained on the full-precision model serves on them.
_QUANT_SUFFIX = re.compile(
    r"[-_.](fp8(-dynamic)?|fp4|nvfp4|int4|int8|w4a16|w8a8|w8a16|awq|gptq|gguf|bnb-4bit|4bit|8bit|mlx)$"
)
# A Hugging Face cache snapshot: .../models--Qwen--QwQ-32B/snapshots/<revision>
_HF_CACHE = re.compile(r"models--([^/]+?)--([^/]+)")


def adapter_config_file(adapter: Adapter) -> Path | None:
    """The adapter's adapter_config.json, or None when it is a hub id or not on disk yet."""
    path = adapter.path
    if path is None or not (path / ADAPTER_CONFIG).is_file():
        return None
    return path / ADAPTER_CONFIG


def read_adapter_config(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{shown(file)}: not a readable adapter config: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{shown(file)}: expected a JSON object (peft's LoraConfig), got {type(data).__name__}")
    return data


def adapter_rank(config: dict[str, Any]) -> int | None:
    """The largest rank in the adapter: `r`, or a larger per-module one in `rank_pattern`."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    ints = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return max(ints) if ints else None


def _is_local(name: str) -> bool:
    """A path rather than a hub id, in what a training tool wrote: the profile's rule, a home
    directory (`~/...`), and anything not shaped like a hub id (`models/qwen/ckpt`)."""
    return is_local(name) or name.startswith("~") or not is_hub_id(name)


def _model_key(name: str) -> tuple[str | None, str]:
    """(organisation or None, model name), lower case, quantization suffix dropped."""
    text = name.strip().rstrip("/").lower()
    cached = _HF_CACHE.search(text)
    if cached:
        org, model = cached.group(1), cached.group(2)
    elif _is_local(text):
        org, model = None, PurePosixPath(text).name
    else:
        org, _, model = text.rpartition("/")
        org = org or None
    while True:
        shorter = _QUANT_SUFFIX.sub("", model)
        if shorter == model:
            return org, model
        model = shorter


def same_model(trained_on: str, served: str) -> bool:
    """Whether an adapter's base_model_name_or_path names the profile's model.

    The same local directory; or the same hub id, whatever its case; or a local directory
    (a downloaded copy, a Hugging Face cache snapshot) holding that hub model; a quantized
    release (-FP8, -AWQ, ...) counts as its full-precision model.
    """
    if _is_local(trained_on) and _is_local(served) and local_dir(trained_on) == local_dir(served):
        return True
    org_a, model_a = _model_key(trained_on)
    org_b, model_b = _model_key(served)
    return model_a == model_b and (org_a is None or org_b is None or org_a == org_b)


def verify_adapters(profile: Profile, source: str) -> None:
    """Refuse an adapter on disk whose rank exceeds lora.max_rank or whose base model differs."""
    if profile.lora is None:
        return
    max_rank = profile.lora.max_rank
    for i, adapter in enumerate(profile.lora.adapters):
        found = adapter_config_file(adapter)
        if found is None:
            continue
        config = read_adapter_config(found)
        file = shown(found)
        key = f"lora.adapters[{i}].source ({adapter.name})"
        rank = adapter_rank(config)
        if rank is None:
            raise ProfileError(f"{source}: {key}: {file} has no rank `r`: is it a LoRA adapter saved by peft?")
        if rank > max_rank:
            fits = [r for r in MAX_LORA_RANKS if r >= rank]
            fix = (f"set lora.max_rank to {fits[0]} (vLLM accepts {', '.join(map(str, MAX_LORA_RANKS))})"
                   if fits else f"vLLM serves ranks up to {MAX_LORA_RANKS[-1]}: use an adapter of lower rank")
            raise ProfileError(
                f"{source}: {key}: {file} has rank {rank} (r / rank_pattern), above lora.max_rank {max_rank}: "
                f"vLLM would refuse to load it; {fix}"
            )
        trained_on = config.get("base_model_name_or_path")
        if isinstance(trained_on, str) and trained_on and not same_model(trained_on, profile.model):
            raise ProfileError(
                f"{source}: {key}: {file} says the adapter was trained on {trained_on!r} "
                f"(base_model_name_or_path) but this profile serves model {profile.model!r}: an adapter only "
                f"works on the weights it was trained on; serve it from a profile of {trained_on!r}, or "
                "correct base_model_name_or_path if that is this model under another name"
            )
