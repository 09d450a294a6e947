"""`deploy check` for `engine: sglang` profiles: the pinned SGLang's own code judges the argv.

SGLang cannot share this venv (it pins another torch, transformers and openai), so the rendered
argv goes to deploy/engines/sglang_probe.py run by `.cache/sglang-venv/bin/python` (`make
sglang-venv`) as a subprocess: an argv list, never a shell string. The probe runs SGLang's
argument parser and ServerArgs checks, its ModelConfig against the profile's config.json (no
weights, no tokenizer) and the rotary embedding SGLang's attention layers would build. The
values returned are the ones SGLang computed, not ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.engines.base import config_theta
from deploy.errors import CheckError
from deploy.paths import CACHE_DIR, REPO_ROOT, shown
from deploy.profile import Profile
from deploy.venv_probe import pinned, run_json

REQUIREMENTS = REPO_ROOT / "deploy" / "sglang-requirements.txt"
SGLANG_PYTHON = CACHE_DIR / "sglang-venv" / "bin" / "python"
PROBE = Path(__file__).with_name("sglang_probe.py")
PROBE_TIMEOUT_S = 600.0  # ~10-30 s normally; a cold disk on a shared machine is slower
YARN_EMBEDDING = "YaRNScalingRotaryEmbedding"


def pinned_version() -> str:
    """The SGLang version deploy/sglang-requirements.txt pins."""
    return pinned(REQUIREMENTS, "sglang")


def run_probe(argv: list[str], env: dict[str, str] | None = None, python: Path = SGLANG_PYTHON) -> dict[str, Any]:
    """The probe's JSON for argv; CheckError when the venv is missing or the probe fails to answer."""
    if not python.is_file():
        raise CheckError(
            f"the SGLang validation venv is missing (no {shown(python)}): run `make sglang-venv` (SGLang "
            f"{pinned_version()} and what its parser imports, ~6 GB, ~4 min) and check again"
        )
    return run_json(python, PROBE, what="the SGLang probe", rebuild="make sglang-venv", error=CheckError,
                    timeout=PROBE_TIMEOUT_S, argv=argv, env=env)


def _refused(profile: Profile, data: dict[str, Any]) -> CheckError:
    error = data.get("error") or {}
    stages = {"server_args": "the arguments", "model_config": "the model config"}
    stage = stages.get(str(error.get("stage")), "the probe")
    where = f" ({error['argument']})" if error.get("argument") else ""
    message = " ".join(str(error.get("message", "")).split())
    return CheckError(f"{profile.name}: SGLang refused {stage}{where}: {message}")


def effective_values(profile: Profile, data: dict[str, Any], config_dir: Path) -> dict[str, Any]:
    """What SGLang computed (the probe's answer), under its names, held to the profile: YaRN must
    be the rotary embedding SGLang builds and the theta config.json's."""
    if not data.get("ok"):
        raise _refused(profile, data)
    version = str(data.get("sglang_version"))
    if version != pinned_version():
        raise CheckError(f"{profile.name}: .cache/sglang-venv holds SGLang {version}, deploy/sglang-requirements.txt "
                         f"pins {pinned_version()}: run `make sglang-venv`")
    args, model, rope = data["server_args"], data["model_config"], data["rope"]
    params: dict[str, Any] = rope.get("rope_parameters") or {}
    rotary: dict[str, Any] = rope.get("rotary_embedding") or {}
    theta = rope.get("rope_theta")
    if profile.rope_scaling is not None:
        if rotary.get("class") != YARN_EMBEDDING or (rotary.get("cos_sin_cache_positions") or 0) < profile.max_model_len:
            raise CheckError(
                f"{profile.name}: rope_scaling: SGLang would build {rotary.get('class')} with "
                f"{rotary.get('cos_sin_cache_positions')} positions, not {YARN_EMBEDDING} with "
                f"{profile.max_model_len} ({rope.get('rotary_embedding_error') or 'YaRN not applied'})"
            )
        expected = config_theta(config_dir)
        if expected is not None and theta != expected:
            raise CheckError(
                f"{profile.name}: rope_scaling.rope_theta: SGLang would use {theta} but the model's "
                f"config.json has {expected}; set rope_scaling.rope_theta: {expected}"
            )
    lora: dict[str, Any] = {"lora_max_rank": None, "lora_max_loras_per_batch": None, "lora_max_loaded_loras": None,
                            "lora_adapters": []}
    if args.get("enable_lora"):
        lora = {
            "lora_max_rank": args.get("max_lora_rank"),
            "lora_max_loras_per_batch": args.get("max_loras_per_batch"),
            "lora_max_loaded_loras": args.get("max_loaded_loras"),
            "lora_adapters": [{"name": ref.get("lora_name"), "path": ref.get("lora_path")}
                              for ref in args.get("lora_paths") or [] if isinstance(ref, dict)],
        }
    graphs_off = args.get("cuda_graph_backend_decode") == "disabled" and args.get("cuda_graph_backend_prefill") == "disabled"
    return {
        "sglang_version": version,
        "context_length": int(model["context_len"]),
        "max_position_embeddings": model.get("max_position_embeddings"),
        "dtype": str(model.get("dtype")),
        "quantization": model.get("quantization"),
        "kv_cache_dtype": str(args.get("kv_cache_dtype")),
        "rope_type": str(params.get("rope_type", "default")),
        "rope_factor": params.get("factor"),
        "rope_original_max_position_embeddings": params.get("original_max_position_embeddings"),
        "rope_theta": float(theta) if theta is not None else None,
        "rotary_embedding": rotary.get("class"),  # the class SGLang's attention layers build
        "rotary_positions": rotary.get("cos_sin_cache_positions"),  # positions in its cos/sin cache
        "tensor_parallel_size": int(args["tp_size"]),
        "pipeline_parallel_size": int(args["pp_size"]),
        "mem_fraction_static": args.get("mem_fraction_static"),
        "max_running_requests": args.get("max_running_requests"),
        "chunked_prefill_size": args.get("chunked_prefill_size"),
        "radix_cache": not args.get("disable_radix_cache"),
        "cuda_graphs": not (graphs_off or args.get("disable_cuda_graph")),
        "reasoning_parser": args.get("reasoning_parser"),
        "tool_call_parser": args.get("tool_call_parser"),
        "enable_metrics": bool(args.get("enable_metrics")),
        "access_log_excluded_prefixes": list(args.get("uvicorn_access_log_exclude_prefixes") or []),
        **lora,
    }
