"""Write tests/deploy/golden/forecast.json: aiconfigurator's own estimates, called directly.

Runs in the forecast venv and calls `aiconfigurator.cli.api.cli_estimate` itself, with its own
defaults wherever a case does not set a value (the data version included: None, its latest), so
that tests/deploy/test_forecast_aic.py compares the kit's forecast (deploy/forecast/, through
its probe) with aiconfigurator's figures rather than with the kit's own code. Each case names
the profile, --set overrides and workload the kit forecasts, and the arguments that forecast
must amount to. The figures are exact floats: deterministic for the pinned venv.

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/deploy/test_forecast_aic.py   # runs this
    .cache/forecast-venv/bin/python tests/deploy/forecast_golden.py tests/deploy/golden/forecast.json
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "qwen-serve-forecast-mpl"))
for _name in ("aiconfigurator", "aiconfigurator_core"):
    logging.getLogger(_name).addHandler(logging.NullHandler())
    logging.getLogger(_name).propagate = False

QWEN3 = "configs/model-configs/qwen3-4b-instruct-2507-fp8"
QWQ = "configs/model-configs/qwq-32b"
# name: (the kit's side: profile, --set overrides, IN:OUT), (aiconfigurator's side: cli_estimate's arguments), batches
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], list[int]]] = {
    # Every batch up to the memory plan's KV bound (159 and 37 below): the tests hold plan's choice to them.
    "qwen3-4b-instruct-fp8 on h100, chat": (
        {"profile": "qwen3-4b-instruct-fp8", "sets": [], "workload": [2000, 1000]},
        {"model_path": QWEN3, "system_name": "h100_sxm", "backend_name": "vllm", "tp_size": 1, "pp_size": 1,
         "isl": 2000, "osl": 1000, "kvcache_quant_mode": "bfloat16", "fmha_quant_mode": "bfloat16",
         "free_gpu_memory_fraction": 0.9},
        list(range(1, 160)),
    ),
    # An fp8 KV cache: the figures (3,279.887 tokens/s at 64, 6,886.045 at 256).
    "qwen3-4b-instruct-fp8 on h100, fp8 KV cache": (
        {"profile": "qwen3-4b-instruct-fp8", "sets": ["kv_cache_dtype=fp8"], "workload": [2000, 1000]},
        {"model_path": QWEN3, "system_name": "h100_sxm", "backend_name": "vllm", "tp_size": 1, "pp_size": 1,
         "isl": 2000, "osl": 1000, "kvcache_quant_mode": "fp8", "free_gpu_memory_fraction": 0.9},
        [64, 256],
    ),
    "qwq-32b on h100, tensor 2, reasoning": (
        {"profile": "qwq-32b", "sets": [], "workload": [1000, 8000]},
        {"model_path": QWQ, "system_name": "h100_sxm", "backend_name": "vllm", "tp_size": 2, "pp_size": 1,
         "isl": 1000, "osl": 8000, "kvcache_quant_mode": "bfloat16", "fmha_quant_mode": "bfloat16",
         "free_gpu_memory_fraction": 0.92},
        list(range(1, 38)),  # the memory plan's KV bound for it: 37
    ),
    "qwq-32b-short on h100, pipeline 2": (
        {"profile": "qwq-32b-short", "sets": ["parallelism.tensor=1", "parallelism.pipeline=2"], "workload": [2000, 1000]},
        {"model_path": QWQ, "system_name": "h100_sxm", "backend_name": "vllm", "tp_size": 1, "pp_size": 2,
         "isl": 2000, "osl": 1000, "kvcache_quant_mode": "bfloat16", "fmha_quant_mode": "bfloat16",
         "free_gpu_memory_fraction": 0.92},
        [8],
    ),
    "qwen3-4b-instruct-fp8-sglang on h200, tensor 2": (
        {"profile": "qwen3-4b-instruct-fp8-sglang", "sets": [], "workload": [2000, 1000]},
        {"model_path": QWEN3, "system_name": "h200_sxm", "backend_name": "sglang", "tp_size": 2, "pp_size": 1,
         "isl": 2000, "osl": 1000, "kvcache_quant_mode": "bfloat16", "fmha_quant_mode": "bfloat16",
         "free_gpu_memory_fraction": 0.85},
        [1, 64, 256, 1000],  # 1,000 requests of 3,000 tokens: OOM
    ),
}


def estimate(arguments: dict[str, Any], batch: int) -> dict[str, Any]:
    from aiconfigurator.cli.api import cli_estimate

    args = dict(arguments)
    try:
        r = cli_estimate(args.pop("model_path"), args.pop("system_name"), batch_size=batch, **args)
    except RuntimeError as exc:
        if str(exc).startswith("OOM:"):
            return {"batch": batch, "oom": True}
        raise
    return {"batch": batch, "oom": False, "kv_cache_warning": r.kv_cache_warning is not None,
            "ttft_ms": float(r.ttft), "tpot_ms": float(r.tpot), "tokens_per_s": float(r.tokens_per_second),
            "tokens_per_s_per_gpu": float(r.tokens_per_second_per_gpu), "data_version": str(r.raw["version"])}


def main(out: str) -> int:
    cases = {}
    for name, (kit, arguments, batches) in CASES.items():
        points = [estimate(arguments, batch) for batch in batches]
        versions = {p.pop("data_version") for p in points if "data_version" in p}
        cases[name] = {"kit": kit, "cli_estimate": arguments, "data_version": versions.pop(), "points": points}
    golden = {"aiconfigurator": importlib.metadata.version("aiconfigurator"), "cases": cases}
    with open(out, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
