"""Ask aiconfigurator for TTFT, TPOT and tokens/s at many batch sizes; JSON in on stdin, JSON out.

Runs inside the forecast venv (`make forecast-venv` -> .cache/forecast-venv/bin/python), never in
the project's venv: it imports only the standard library and aiconfigurator. deploy/forecast/aic.py
builds the request from a profile and reads the answer.

    echo '{"jobs": [{"model_dir": "configs/model-configs/qwq-32b", "system": "h100_sxm",
            "backend": "vllm", "kvcache_quant_mode": "bfloat16", "free_gpu_memory_fraction": 0.92,
            "isl": 2000, "osl": 4000, "layouts": [{"tensor": 2, "pipeline": 1, "batches": [32]}]}]}' \
      | .cache/forecast-venv/bin/python deploy/forecast/probe.py

Each job is one model, GPU system, engine and workload, with its layouts and the batch sizes to
estimate. Every estimate is `aiconfigurator.cli.api.cli_estimate` in its aggregated mode (one
engine, continuous batching, `batch` requests always in flight), with the data version resolved
once per job and passed in (otherwise it rescans its ~500 data files on every call: 0.85 s
instead of ~10 ms). A point is {batch, ttft_ms, tpot_ms, tokens_per_s, tokens_per_s_per_gpu,
kv_cache_warning, oom}: kv_cache_warning when the batch's KV cache exceeds
aiconfigurator's own estimate of what the memory fraction holds (figures still given), oom when
weights + KV + overheads exceed the GPU (no figures). Memory only grows with the batch, so after
the first OOM the larger batches of that layout are OOM without asking.

Answer: {"ok": true, "aiconfigurator": version, "results": [per job: {"ok": true, "source":
{...}, "layouts": [{"tensor", "pipeline", "points": [...]} or {"tensor", "pipeline", "error":
aiconfigurator's refusal of that layout, e.g. GEMM data missing for the checkpoint's
quantization}], "notes": [...]} or {"ok": false, "error": {"kind", "message"}}]}. Kinds: no_data
(no data for this system and engine; `supported` lists the systems that have it), architecture
(`supported` lists the ones it models), input (a malformed job). Exit 0 when the request could
be read (each job answers for itself), 2 when not.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
from typing import Any

# Run as a script, Python puts this directory first on sys.path, where the sibling modules would
# shadow any top-level module of the same name that aiconfigurator imports: drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

# Before aiconfigurator is imported: aiconfigurator.cli.api imports matplotlib.pyplot, which
# writes a font cache under $HOME unless told where (the caller points this into the venv).
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "qwen-serve-forecast-mpl"))

KV_MODES = ("bfloat16", "fp8")  # aiconfigurator's KVCacheQuantMode names that our profiles map to
NOTES: list[str] = []


class _Keep(logging.Handler):
    """aiconfigurator's loggers have no handler as a library, so their WARNINGs would reach stderr
    through logging.lastResort: keep them for the answer instead."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # Logged on every database load, about MLA/DSA tables that dense models never query.
        if record.levelno >= logging.WARNING and not message.startswith("Loading low-fidelity fallback rows"):
            NOTES.append(message)


for _name in ("aiconfigurator", "aiconfigurator_core"):
    _logger = logging.getLogger(_name)
    _logger.addHandler(_Keep())
    _logger.setLevel(logging.WARNING)
    _logger.propagate = False


class Refused(Exception):
    def __init__(self, kind: str, message: str, supported: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.supported = kind, message, supported

    def answer(self) -> dict[str, Any]:
        error: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.supported is not None:
            error["supported"] = self.supported
        return {"ok": False, "error": error}


def _positive(job: dict[str, Any], key: str, minimum: int = 1) -> int:
    value = job.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise Refused("input", f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_job(job: dict[str, Any]) -> None:
    """What aiconfigurator would get wrong rather than refuse: an isl of 0 divides by zero, an osl
    of 1 gives 0 tokens/s, a batch of 0 is an UnboundLocalError, a tensor size not dividing the
    heads is only a bare assert, and a model_dir that is not a directory is fetched from the hub."""
    _positive(job, "isl")
    _positive(job, "osl", 2)
    model_dir = job.get("model_dir")
    if not isinstance(model_dir, str) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise Refused("input", f"no config.json in {model_dir!r} (a local directory; never a hub id)")
    if job.get("kvcache_quant_mode") not in KV_MODES:
        raise Refused("input", f"kvcache_quant_mode must be one of {list(KV_MODES)}, got {job.get('kvcache_quant_mode')!r}")
    fraction = job.get("free_gpu_memory_fraction")
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise Refused("input", f"free_gpu_memory_fraction must be in (0, 1], got {fraction!r}")
    with open(os.path.join(model_dir, "config.json")) as f:
        heads = int(json.load(f)["num_attention_heads"])
    layouts = job.get("layouts")
    if not isinstance(layouts, list) or not layouts:
        raise Refused("input", "layouts must be a non-empty list")
    for layout in layouts:
        tensor = _positive(layout, "tensor")
        _positive(layout, "pipeline")
        if heads % tensor:
            raise Refused("input", f"tensor {tensor} does not divide the model's {heads} attention heads")
        batches = layout.get("batches")
        if not isinstance(batches, list) or not batches:
            raise Refused("input", "each layout needs a non-empty list of batches")
        for batch in batches:
            _positive({"batch": batch}, "batch")


def _architecture(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        architectures = json.load(f).get("architectures") or ["(none)"]
    return str(architectures[0])


@functools.cache
def _supported() -> dict[str, dict[str, list[str]]]:
    """{system: {backend: [versions]}}: aiconfigurator rescans its data files on every call (~0.3 s)."""
    from aiconfigurator_core.sdk.perf_database import get_supported_databases

    supported: dict[str, dict[str, list[str]]] = get_supported_databases()
    return supported


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from aiconfigurator.cli.api import cli_estimate
    from aiconfigurator_core.sdk.common import ARCHITECTURE_TO_MODEL_FAMILY
    from aiconfigurator_core.sdk.perf_database import get_version_slots

    _check_job(job)
    system, backend, model_dir = str(job.get("system")), str(job.get("backend")), job["model_dir"]
    supported = _supported()
    if backend not in supported.get(system, {}):
        have = sorted(name for name, backends in supported.items() if backend in backends)
        raise Refused("no_data", f"aiconfigurator has no {backend} data for {system}", have)
    architecture = _architecture(model_dir)
    if architecture not in ARCHITECTURE_TO_MODEL_FAMILY:
        raise Refused("architecture", f"aiconfigurator does not model the architecture {architecture}",
                      sorted(ARCHITECTURE_TO_MODEL_FAMILY))
    # The `current` slot is what cli_estimate picks by default (`next` relabels the same data); with
    # no slot, None lets it resolve the latest itself (slowly).
    version = (get_version_slots(system, backend) or {}).get("current")
    kv = job["kvcache_quant_mode"]
    del NOTES[:]
    layouts, data_version = [], None
    for layout in job["layouts"]:
        tensor, pipeline = layout["tensor"], layout["pipeline"]
        points: list[dict[str, Any]] = []
        error = None
        for batch in layout["batches"]:
            if points and points[-1]["oom"]:
                points.append({"batch": batch, "oom": True})
                continue
            try:
                result = cli_estimate(
                    model_dir, system, backend_name=backend, backend_version=version,
                    isl=job["isl"], osl=job["osl"], batch_size=batch, tp_size=tensor, pp_size=pipeline,
                    kvcache_quant_mode=kv,
                    # A bf16 KV cache means bf16 attention; for an FP8 checkpoint aiconfigurator
                    # would otherwise guess fp8 attention and fall back with a warning.
                    fmha_quant_mode="bfloat16" if kv == "bfloat16" else None,
                    free_gpu_memory_fraction=float(job["free_gpu_memory_fraction"]),
                )
            except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
                if isinstance(exc, RuntimeError) and str(exc).startswith("OOM:"):
                    points.append({"batch": batch, "oom": True})
                    continue
                # Missing data for this layout (a GEMM shape, a TP size): the others may still be modelled.
                error = f"batch {batch}: {type(exc).__name__}: {' '.join(str(exc).split())}"
                break
            data_version = str(result.raw["version"])
            # numpy floats: float() them (json refuses numpy.bool_ and would be wrong to guess).
            points.append({
                "batch": batch, "oom": False, "kv_cache_warning": result.kv_cache_warning is not None,
                "ttft_ms": float(result.ttft), "tpot_ms": float(result.tpot),
                "tokens_per_s": float(result.tokens_per_second),
                "tokens_per_s_per_gpu": float(result.tokens_per_second_per_gpu),
            })
        if error is None:
            layouts.append({"tensor": tensor, "pipeline": pipeline, "points": points})
        else:
            layouts.append({"tensor": tensor, "pipeline": pipeline, "error": error})
    return {
        "ok": True,
        "source": {"backend": backend, "data_version": data_version or version or "latest", "system": system},
        "layouts": layouts,
        "notes": sorted(set(NOTES)),
    }


def main() -> int:
    try:
        request = json.load(sys.stdin)
        jobs = request["jobs"]
        if not isinstance(jobs, list) or not all(isinstance(job, dict) for job in jobs):
            raise TypeError("jobs must be a list of objects")
    except (ValueError, KeyError, TypeError) as exc:
        json.dump({"ok": False, "error": {"kind": "input", "message": f"unreadable request: {exc}"}}, sys.stdout)
        return 2
    results = []
    for job in jobs:
        try:
            # Nothing seen printing on stdout, but the JSON answer must be the only thing there.
            with contextlib.redirect_stdout(sys.stderr):
                results.append(run_job(job))
        except Refused as refused:
            results.append(refused.answer())
    json.dump({"ok": True, "aiconfigurator": importlib.metadata.version("aiconfigurator"), "results": results},
              sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
