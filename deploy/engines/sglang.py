"""SGLang as the engine of a profile (`engine: sglang`): what it refuses and the argv it renders.

The same typed profile maps onto SGLang's `python -m sglang.launch_server` flags (the pinned
version is the one line `sglang==...` in deploy/sglang-requirements.txt). Flag names, choices and
behaviour were read from that release's source (`.cache/sglang-venv`, see /work/notes/sglang.md
for the file:line of each); `deploy check` runs the rendered argv through SGLang's own parser.
Settings SGLang has no equivalent for are refused when the profile loads, so render, check,
the chart and serve never see them. Nothing here imports SGLang: it cannot live in this venv.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from deploy.paths import REPO_ROOT

if TYPE_CHECKING:
    from deploy.profile import Profile

SERVER_MODULE = "sglang.launch_server"
REQUIREMENTS = REPO_ROOT / "deploy" / "sglang-requirements.txt"

# The vLLM parser names our profiles use, where the pinned SGLang spells the same parser otherwise
# (sglang.srt.server_args._reasoning_parser_choices / _tool_call_parser_choices). Names not
# listed go through unchanged; `deploy check` holds them to SGLang's own choices.
REASONING_PARSERS = {"deepseek_r1": "deepseek-r1", "deepseek_v3": "deepseek-v3", "openai_gptoss": "gpt-oss"}
TOOL_CALL_PARSERS = {"llama3_json": "llama3", "deepseek_v3": "deepseekv3", "deepseek_v31": "deepseekv31",
                     "openai": "gpt-oss"}
# vLLM's `fp8` KV cache is e4m3; SGLang has no plain `fp8` (fields/model.py kv_cache_dtype).
KV_CACHE_DTYPES = {"fp8": "fp8_e4m3"}

# engine_args keys the profile's own keys render for SGLang, and vLLM flags that belong to a
# profile key: an engine_args entry with one of these names is refused, naming the key to use.
RENDERED_BY_KEY = {
    "model-path": "model", "model": "model", "served-model-name": "served_model_name", "host": "(fixed: 0.0.0.0)",
    "port": "port", "dtype": "dtype", "context-length": "max_model_len", "max-model-len": "max_model_len",
    "json-model-override-args": "rope_scaling", "hf-overrides": "rope_scaling", "rope-scaling": "rope_scaling",
    "quantization": "quantization", "kv-cache-dtype": "kv_cache_dtype", "tp-size": "parallelism.tensor",
    "tensor-parallel-size": "parallelism.tensor", "pp-size": "parallelism.pipeline",
    "pipeline-parallel-size": "parallelism.pipeline", "distributed-executor-backend": "parallelism.executor",
    "mem-fraction-static": "gpu_memory_utilization", "gpu-memory-utilization": "gpu_memory_utilization",
    "max-running-requests": "max_num_seqs", "max-num-seqs": "max_num_seqs",
    "chunked-prefill-size": "max_num_batched_tokens / enable_chunked_prefill",
    "max-num-batched-tokens": "max_num_batched_tokens", "enable-chunked-prefill": "enable_chunked_prefill",
    "disable-radix-cache": "enable_prefix_caching", "enable-prefix-caching": "enable_prefix_caching",
    "disable-cuda-graph": "enforce_eager", "enforce-eager": "enforce_eager",
    "cuda-graph-backend-decode": "enforce_eager", "cuda-graph-backend-prefill": "enforce_eager",
    "reasoning-parser": "reasoning_parser", "tool-call-parser": "tool_call_parser",
    "enable-auto-tool-choice": "enable_auto_tool_choice", "enable-metrics": "(always rendered)",
    "uvicorn-access-log-exclude-prefixes": "access_log_exclude",
    "disable-access-log-for-endpoints": "access_log_exclude", "device": "device",
    "enable-lora": "lora", "lora-paths": "lora.adapters", "lora-modules": "lora.adapters",
    "max-lora-rank": "lora.max_rank", "max-loras-per-batch": "lora.max_loras", "max-loras": "lora.max_loras",
    "max-loaded-loras": "lora.max_cpu_loras", "max-cpu-loras": "lora.max_cpu_loras",
}


def pinned_version() -> str:
    """The SGLang version, read from the one line that names it."""
    for line in REQUIREMENTS.read_text().splitlines():
        if line.startswith("sglang=="):
            return line.removeprefix("sglang==").strip()
    raise RuntimeError(f"{REQUIREMENTS}: no 'sglang==<version>' line")


def refusals(profile: Profile) -> list[str]:
    """Every setting of an `engine: sglang` profile that SGLang has no equivalent for, each as
    'key: what is wrong; what to do'. Empty for a profile SGLang can serve as written."""
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
    for key in p.engine_args:
        if key in RENDERED_BY_KEY:
            owner = RENDERED_BY_KEY[key]
            fix = f"remove it, the kit renders it {owner}" if owner.startswith("(") else f"set {owner} instead"
            out.append(f"engine_args.{key}: a flag the profile's keys render for SGLang (or vLLM's name for "
                       f"one): {fix}")
    return out


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def engine_args(profile: Profile, model: str | None = None) -> list[str]:
    """The SGLang launch_server arguments (without the program), in a fixed order."""
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
    for name, value in p.engine_args.items():
        if value is True:
            args.append(_flag(name))
        elif value is not False and value is not None:
            args += [_flag(name), str(value)]
    return args


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
