"""SGLang as the engine of a profile (`engine: sglang`): what it refuses and the argv it renders.

The same typed profile maps onto SGLang's `python -m sglang.launch_server` flags (the pinned
version is the one line `sglang==...` in deploy/sglang-requirements.txt). Flag names, choices and
behaviour were read from that release's source (`.cache/sglang-venv`, see /work/notes/sglang.md
for the file:line of each); `deploy check` runs the rendered argv through SGLang's own parser
(deploy/engines/sglang_check.py, which runs deploy/engines/sglang_probe.py in SGLang's venv).
Settings SGLang has no equivalent for are refused when the profile loads, so render, check,
the chart and serve never see them. Nothing here imports SGLang: it cannot live in this venv.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from deploy.engines import sglang_check
from deploy.engines.base import Effective, Engine, EngineMetrics, config_dir, extra_args, rope_row
from deploy.errors import CheckError
from deploy.host import visible_gpus
from deploy.profile import Profile

# The vLLM parser names our profiles use, where the pinned SGLang spells the same parser otherwise
# (sglang.srt.server_args._reasoning_parser_choices / _tool_call_parser_choices). Names not
# listed go through unchanged; `deploy check` holds them to SGLang's own choices.
REASONING_PARSERS = {"deepseek_r1": "deepseek-r1", "deepseek_v3": "deepseek-v3", "openai_gptoss": "gpt-oss"}
TOOL_CALL_PARSERS = {"llama3_json": "llama3", "deepseek_v3": "deepseekv3", "deepseek_v31": "deepseekv31",
                     "openai": "gpt-oss"}
# vLLM's `fp8` KV cache is e4m3; SGLang has no plain `fp8` (fields/model.py kv_cache_dtype).
KV_CACHE_DTYPES = {"fp8": "fp8_e4m3"}


def _override_args(profile: Profile) -> dict[str, object] | None:
    """YaRN for SGLang: `rope_type` (with `type`, transformers 5 keeps rope_type 'default' and
    SGLang silently builds a plain rotary embedding) and max_position_embeddings = the context
    (SGLang takes a YaRN model's context from max_position_embeddings when the rope dict has
    original_max_position_embeddings, and refuses a longer --context-length). SGLang merges the
    dict into the model's, so theta would be kept anyway; it is written for the reader."""
    rope = profile.rope_scaling
    if rope is None:
        return None
    return {
        "max_position_embeddings": profile.max_model_len,
        "rope_scaling": {"rope_type": rope.type, "factor": rope.factor,
                         "original_max_position_embeddings": rope.original_max_position_embeddings,
                         "rope_theta": rope.rope_theta},
    }


def _lora_args(profile: Profile) -> list[str]:
    """--enable-lora and its limits, and the adapters in --lora-paths' JSON form.

    SGLang's --max-loras-per-batch counts the base model as one of the batch's adapters ("include
    base-only request", fields/lora.py; its memory pool keeps the base model, uid None, in a slot:
    lora/mem_pool.py), so it is the profile's max_loras + 1. --max-loaded-loras (adapters in CPU
    memory) must be at least that, so max_cpu_loras == max_loras renders as max_loras + 1.
    """
    lora = profile.lora
    if lora is None:
        return []
    per_batch = lora.max_loras + 1
    args = ["--enable-lora", "--max-lora-rank", str(lora.max_rank), "--max-loras-per-batch", str(per_batch)]
    if lora.max_cpu_loras is not None:
        args += ["--max-loaded-loras", str(max(lora.max_cpu_loras, per_batch))]
    paths = [json.dumps({"lora_name": a.name, "lora_path": str(a.path) if a.path else a.source},
                        separators=(",", ":")) for a in lora.adapters]
    return [*args, "--lora-paths", *paths]


@dataclass(frozen=True)
class Sglang(Engine):
    # The interpreter of the validation venv that runs the probe (tests point it elsewhere).
    python: Path = sglang_check.SGLANG_PYTHON

    name = "sglang"
    label = "SGLang"
    server_module = "sglang.launch_server"
    # Every long option string of each dest the profile's keys set (SGLang's own parser, aliases
    # included); tests/deploy/test_engine_flags.py holds this to it.
    key_flags: ClassVar[Mapping[str, str]] = {
        "model-path": "model", "model": "model", "served-model-name": "served_model_name", "port": "port",
        "dtype": "dtype", "context-length": "max_model_len", "json-model-override-args": "rope_scaling",
        "quantization": "quantization", "kv-cache-dtype": "kv_cache_dtype",
        "tp-size": "parallelism.tensor", "tensor-parallel-size": "parallelism.tensor",
        "pp-size": "parallelism.pipeline", "pipeline-parallel-size": "parallelism.pipeline",
        "mem-fraction-static": "gpu_memory_utilization", "max-running-requests": "max_num_seqs",
        "chunked-prefill-size": "max_num_batched_tokens (or enable_chunked_prefill)",
        "disable-radix-cache": "enable_prefix_caching",
        "cuda-graph-backend-decode": "enforce_eager", "cuda-graph-backend-prefill": "enforce_eager",
        "disable-cuda-graph": "enforce_eager",  # deprecated in the pinned SGLang; the same switch
        "reasoning-parser": "reasoning_parser", "tool-call-parser": "tool_call_parser",
        "uvicorn-access-log-exclude-prefixes": "access_log_exclude", "device": "device",
        "enable-lora": "lora", "lora-paths": "lora.adapters", "max-lora-rank": "lora.max_rank",
        "max-loras-per-batch": "lora.max_loras", "max-loaded-loras": "lora.max_cpu_loras",
    }
    fixed_flags: ClassVar[Mapping[str, str]] = {
        "host": "0.0.0.0, as SGLang listens on 127.0.0.1 by default",
        "enable-metrics": "the chart and the benchmarks scrape SGLang's metrics",
    }
    budget_flag = "--mem-fraction-static"
    budget_holds_activations = False
    aiconfigurator_backend = "sglang"
    # SGLang 0.5.23's names for what the benchmarks report (srt/observability/metrics_collector.py;
    # --enable-metrics, which every SGLang profile renders). Its cache counts cached prompt tokens.
    metrics = EngineMetrics(
        counters={
            "sglang:prompt_tokens_total": "prompt_tokens",
            "sglang:generation_tokens_total": "generation_tokens",
            "sglang:num_retracted_requests_total": "preemptions",
            "sglang:cached_tokens_total": "prefix_cache_hits",
            "sglang:num_requests_total": "requests_finished",
        },
        peak_gauges={
            "sglang:token_usage": "peak_kv_cache_usage",
            "sglang:num_running_reqs": "peak_requests_running",
            "sglang:num_queue_reqs": "peak_requests_waiting",
        },
        requests_finished="sglang:num_requests_total",
        requests_waiting="sglang:num_queue_reqs",
    )

    def refusals(self, profile: Profile) -> list[str]:
        p, out = profile, []
        if p.device != "cuda":
            out.append("device: engine sglang serves on NVIDIA GPUs only (device: cuda); on this CPU use "
                       "engine: vllm (e.g. the tiny-qwen3 profile)")
        par = p.parallelism
        if par.executor == "ray":
            out.append("parallelism.executor: ray is vLLM's Ray executor; SGLang runs tensor x pipeline on one node "
                       "(multi-node SGLang is one launch per node with --nnodes/--node-rank, which this kit does "
                       "not render): remove executor (mp) and keep tensor x pipeline within one node")
        if par.gpus_per_node is not None:
            out.append("parallelism.gpus_per_node: SGLang has no such setting (one node holds tensor x pipeline "
                       "GPUs): remove it")
        if p.tool_call_parser and not p.enable_auto_tool_choice:
            out.append("enable_auto_tool_choice: false, but SGLang answers tool_choice auto whenever a "
                       "tool_call_parser is set (there is no switch): set enable_auto_tool_choice: true or "
                       "remove tool_call_parser")
        if p.max_num_batched_tokens is not None and not p.enable_chunked_prefill:
            out.append("max_num_batched_tokens: SGLang's equivalent is the prefill chunk size "
                       "(--chunked-prefill-size), which enable_chunked_prefill: false turns off (-1): remove "
                       "max_num_batched_tokens or enable chunked prefill")
        for name in sorted(key for key in p.env if key.startswith("VLLM_")):
            out.append(f"env.{name}: a vLLM variable, SGLang ignores it: remove it (SGLang reads SGLANG_* variables)")
        return out

    def version(self) -> str:
        """The pinned SGLang (deploy/sglang-requirements.txt): it is not installed in this venv."""
        return sglang_check.pinned_version()

    def serve_refusal(self, profile: Profile) -> str:
        """The launcher starts vLLM only: SGLang needs an NVIDIA GPU and its own CUDA install (the
        lmsysorg/sglang image), which this kit's venv does not hold (it has only the validation venv)."""
        return (
            f"{profile.name}: engine: sglang: `serve` starts vLLM only. SGLang {sglang_check.pinned_version()} "
            f"needs an NVIDIA GPU ({visible_gpus()} visible here) and its own CUDA install (SGLang's "
            f"lmsysorg/sglang image): run `python -m deploy render {profile.name}` for its exact "
            f"`python -m {self.server_module}` argv, start it there, then put the proxy in front of it with "
            f"`python -m serving --backend {profile.name}=http://<host>:{profile.port}`. "
            "On this machine: MODEL=tiny-qwen3 (vLLM on the CPU)."
        )

    def lora_slots(self, max_loras: int) -> int:
        return max_loras + 1  # --max-loras-per-batch: SGLang's pool gives the base model a slot too

    def args(self, profile: Profile, model: str | None = None) -> list[str]:
        p = profile
        args: list[str] = [
            "--model-path", model or (str(p.model_path) if p.model_path else p.model),
            # One name only (SGLang's served_model_name is a str): aliases are the proxy's.
            "--served-model-name", p.served_model_name,
            "--host", "0.0.0.0", "--port", str(p.port),  # SGLang listens on 127.0.0.1 by default
            "--dtype", p.dtype,
            "--context-length", str(p.max_model_len),
        ]
        overrides = _override_args(p)
        if overrides is not None:
            args += ["--json-model-override-args", json.dumps(overrides, sort_keys=True, separators=(",", ":"))]
        if p.quantization:
            args += ["--quantization", p.quantization]
        if p.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", KV_CACHE_DTYPES.get(p.kv_cache_dtype, p.kv_cache_dtype)]
        args += ["--tp-size", str(p.parallelism.tensor), "--pp-size", str(p.parallelism.pipeline)]
        # Not the same budget: vLLM's gpu_memory_utilization is all the GPU memory the engine may use;
        # SGLang's mem_fraction_static covers weights + the KV pool, activations and CUDA graphs come
        # on top. Rendered as written (SGLang derives its own default from GPU memory otherwise).
        args += ["--mem-fraction-static", str(p.gpu_memory_utilization)]
        if p.max_num_seqs is not None:
            args += ["--max-running-requests", str(p.max_num_seqs)]
        if not p.enable_chunked_prefill:
            args += ["--chunked-prefill-size", "-1"]
        elif p.max_num_batched_tokens is not None:
            # Tokens per prefill chunk; decode tokens are not in SGLang's budget as they are in vLLM's.
            args += ["--chunked-prefill-size", str(p.max_num_batched_tokens)]
        if not p.enable_prefix_caching:
            args.append("--disable-radix-cache")
        if p.enforce_eager:
            # --disable-cuda-graph is deprecated in the pinned SGLang and points to these (torch.compile is off by default).
            args += ["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled"]
        if p.reasoning_parser:
            args += ["--reasoning-parser", REASONING_PARSERS.get(p.reasoning_parser, p.reasoning_parser)]
        if p.tool_call_parser:  # tool_choice auto needs no separate switch in SGLang
            args += ["--tool-call-parser", TOOL_CALL_PARSERS.get(p.tool_call_parser, p.tool_call_parser)]
        args += _lora_args(p)
        args.append("--enable-metrics")  # off by default in SGLang; the chart and benchmarks scrape it
        if p.access_log_exclude:  # SGLang matches prefixes, vLLM exact paths
            args += ["--uvicorn-access-log-exclude-prefixes", *p.access_log_exclude]
        return args + extra_args(p.engine_args)

    def check(self, profile: Profile) -> Effective:
        """Run the rendered argv through SGLang's own code (the probe, in SGLang's venv), on the
        CPU without the tokenizer: SGLang's parser and ModelConfig need no GPU."""
        found = config_dir(profile)
        argv = [*self.args(profile, model=str(found)), "--skip-tokenizer-init", "--device", "cpu"]
        try:
            data = sglang_check.run_probe(argv, env=dict(profile.env), python=self.python)
        except CheckError as exc:
            raise CheckError(f"{profile.name}: {exc}") from None
        values = sglang_check.effective_values(profile, data, found)
        return Effective(profile=profile.name, engine=self.name, computed_by=f"{self.label} {values['sglang_version']}",
                         values=values)

    def effective_rows(self, effective: Effective) -> list[tuple[str, object]]:
        values = effective.values
        skipped = values["access_log_excluded_prefixes"]
        rows: list[tuple[str, object]] = [
            ("context length", values["context_length"]),
            ("rope scaling", rope_row(values)),
            ("rotary embedding", f"{values['rotary_embedding']} ({values['rotary_positions']} positions)"),
            ("rope theta", values["rope_theta"]),
            ("dtype", values["dtype"]),
            ("quantization", values["quantization"] or "none"),
            ("kv cache dtype", values["kv_cache_dtype"]),
            ("tensor x pipeline", f"{values['tensor_parallel_size']} x {values['pipeline_parallel_size']}"),
            ("mem fraction", values["mem_fraction_static"]),
            ("running requests", values["max_running_requests"] or "SGLang's default (from GPU memory)"),
            ("prefill chunk", values["chunked_prefill_size"] or "SGLang's default (from GPU memory)"),
            ("radix cache", values["radix_cache"]),
            ("cuda graphs", values["cuda_graphs"]),
            ("reasoning parser", values["reasoning_parser"] or "none"),
            ("tool-call parser", values["tool_call_parser"] or "none (tool_choice auto: with a parser)"),
            ("metrics", values["enable_metrics"]),
            ("access log skips", " ".join(map(str, skipped)) + " (prefixes)" if skipped else "nothing"),
        ]
        if values["lora_max_rank"] is not None:
            rows.append(("lora", (f"max rank {values['lora_max_rank']}, {values['lora_max_loras_per_batch']} per "
                                  f"batch (the base model included), {values['lora_max_loaded_loras'] or 'any'} loaded")))
            rows += [("adapter", f"{adapter['name']}: {adapter['path']}") for adapter in values["lora_adapters"]]
        return rows


SGLANG = Sglang()
