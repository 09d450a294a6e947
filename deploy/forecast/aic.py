"""aiconfigurator, run in its own venv: what a profile asks it, and its answer, typed.

aiconfigurator pulls pandas, pyarrow, scipy and matplotlib, which stay out of the serving venv:
deploy/forecast/probe.py runs in `.cache/forecast-venv` (`make forecast-venv`) as a subprocess
(an argv list; JSON on stdin and stdout), like SGLang's probe. All of a forecast's points go in
one call: importing aiconfigurator and loading its database take ~2 s, a point ~10 ms.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from deploy.paths import CACHE_DIR, REPO_ROOT, shown
from deploy.venv_probe import pinned, run_json

REQUIREMENTS = REPO_ROOT / "deploy" / "forecast-requirements.txt"
FORECAST_PYTHON = CACHE_DIR / "forecast-venv" / "bin" / "python"
PROBE = Path(__file__).with_name("probe.py")
PROBE_TIMEOUT_S = 1800.0  # a sweep of a few thousand points takes ~30 s; a busy 2-core box more
# The profile's kv_cache_dtype as aiconfigurator's KVCacheQuantMode. `auto` is the model's dtype,
# never aiconfigurator's own guess (an fp8 KV cache for any FP8 checkpoint, which vLLM and SGLang
# do not use unless told): fp16 has the bf16 cache's size and kernels.
KV_CACHE_MODES = {"fp8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}
AUTO_KV_CACHE_MODES = {"bfloat16": "bfloat16", "float16": "bfloat16"}


def pinned_version() -> str:
    """The aiconfigurator version deploy/forecast-requirements.txt pins."""
    return pinned(REQUIREMENTS, "aiconfigurator")


def kvcache_mode(kv_cache_dtype: str, model_dtype: str) -> str:
    """aiconfigurator's name for the KV cache a profile gets (kv_cache_dtype, else the model's dtype)."""
    if kv_cache_dtype != "auto":
        return KV_CACHE_MODES[kv_cache_dtype]
    if model_dtype not in AUTO_KV_CACHE_MODES:
        raise DeployError(f"kv_cache_dtype auto on a {model_dtype} model: aiconfigurator models bfloat16 and "
                          "fp8 KV caches only; set kv_cache_dtype: fp8 or dtype: bfloat16")
    return AUTO_KV_CACHE_MODES[model_dtype]


@dataclass(frozen=True)
class Figures:
    ttft_ms: float
    tpot_ms: float
    tokens_per_s: float  # output tokens/s of one replica
    tokens_per_s_per_gpu: float


@dataclass(frozen=True)
class Point:
    """aiconfigurator's estimate at one batch (requests in flight)."""

    batch: int
    figures: Figures | None  # None: OOM, aiconfigurator's memory model does not fit the batch at all
    kv_cache_warning: bool = False  # the batch's KV cache exceeds aiconfigurator's own estimate of what fits

    @property
    def oom(self) -> bool:
        return self.figures is None

    @property
    def held(self) -> Figures | None:
        """The figures where aiconfigurator's memory model holds the batch (no OOM, no KV warning)."""
        return None if self.kv_cache_warning else self.figures

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Point:
        if data["oom"]:
            return cls(batch=int(data["batch"]), figures=None)
        values = {key: float(data[key]) for key in ("ttft_ms", "tpot_ms", "tokens_per_s", "tokens_per_s_per_gpu")}
        if not all(math.isfinite(value) for value in values.values()):
            raise DeployError(f"aiconfigurator answered a non-finite figure at batch {data['batch']}: {values}")
        return cls(batch=int(data["batch"]), figures=Figures(**values),
                   kv_cache_warning=bool(data["kv_cache_warning"]))


@dataclass(frozen=True)
class Source:
    """Which model made the figures: always printed beside them."""

    aiconfigurator: str
    backend: str
    data_version: str
    system: str

    @property
    def text(self) -> str:
        """What every figure it made is printed beside."""
        return (f"modelled by aiconfigurator {self.aiconfigurator} with its {self.backend} {self.data_version} data "
                f"for {self.system}, not measured")


@dataclass(frozen=True)
class Job:
    """One model on one GPU system and engine, for one workload; its layouts and their batches."""

    model_dir: Path
    system: str
    backend: str
    kvcache_quant_mode: str
    free_gpu_memory_fraction: float
    isl: int
    osl: int
    layouts: list[tuple[int, int, list[int]]]  # (tensor, pipeline, batches)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir), "system": self.system, "backend": self.backend,
            "kvcache_quant_mode": self.kvcache_quant_mode, "free_gpu_memory_fraction": self.free_gpu_memory_fraction,
            "isl": self.isl, "osl": self.osl,
            "layouts": [{"tensor": t, "pipeline": p, "batches": batches} for t, p, batches in self.layouts],
        }


@dataclass(frozen=True)
class Answer:
    """The probe's answer to one job: points per (tensor, pipeline), or why it modelled none."""

    source: Source | None = None
    points: dict[tuple[int, int], list[Point]] = field(default_factory=dict)
    layout_errors: dict[tuple[int, int], str] = field(default_factory=dict)  # aiconfigurator refused the layout
    notes: list[str] = field(default_factory=list)
    error_kind: str | None = None  # no_data, architecture, input: nothing was modelled
    error: str | None = None
    supported: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, data: dict[str, Any], version: str) -> Answer:
        if not data.get("ok"):
            error = data.get("error") or {}
            return cls(error_kind=str(error.get("kind")), error=str(error.get("message")),
                       supported=[str(s) for s in error.get("supported") or []])
        src = data["source"]
        points, errors = {}, {}
        for layout in data["layouts"]:
            key = (int(layout["tensor"]), int(layout["pipeline"]))
            if "error" in layout:
                errors[key] = str(layout["error"])
            else:
                points[key] = [Point.parse(p) for p in layout["points"]]
        return cls(source=Source(version, str(src["backend"]), str(src["data_version"]), str(src["system"])),
                   points=points, layout_errors=errors, notes=[str(n) for n in data.get("notes") or []])


def missing_venv(python: Path, system: str | None = None, machine: str | None = None) -> str:
    """What to do without the forecast venv; where aiconfigurator cannot be installed, that too."""
    system, machine = system or platform.system(), machine or platform.machine()
    message = (f"the forecast venv is missing (no {shown(python)}): run `make forecast-venv` "
               f"(aiconfigurator {pinned_version()} and its pinned dependencies, ~850 MB, ~40 s)")
    if (system, machine) != ("Linux", "x86_64"):
        message += (f"; aiconfigurator's core wheel exists for Linux x86-64 only, so it cannot be installed "
                    f"on this {system} {machine}: run the forecast on a Linux x86-64 machine")
    return message


def run_probe(jobs: list[dict[str, Any]], python: Path = FORECAST_PYTHON) -> list[dict[str, Any]]:
    """The probe's raw answer per job; DeployError when the venv is missing or the probe fails."""
    if not python.is_file():
        raise DeployError(missing_venv(python))
    venv = python.parent.parent
    # matplotlib (imported by aiconfigurator.cli.api) writes its font cache here, not under $HOME.
    env = {"MPLBACKEND": "Agg", "MPLCONFIGDIR": str(venv / "matplotlib")}
    data = run_json(python, PROBE, what="the forecast probe", rebuild="make forecast-venv", error=DeployError,
                    timeout=PROBE_TIMEOUT_S, stdin=json.dumps({"jobs": jobs}), env=env)
    if not data.get("ok"):
        error = data.get("error") or {}
        raise DeployError(f"the forecast probe refused the request: {error.get('message', data)}")
    version = str(data.get("aiconfigurator"))
    if version != pinned_version():
        raise DeployError(f"{shown(venv)} holds aiconfigurator {version}, {shown(REQUIREMENTS)} pins "
                          f"{pinned_version()}: run `make forecast-venv`")
    results: list[dict[str, Any]] = data["results"]
    if len(results) != len(jobs):
        raise DeployError(f"the forecast probe answered {len(results)} results for {len(jobs)} jobs")
    for item in results:
        item["aiconfigurator"] = version
    return results


def estimate(jobs: list[Job], python: Path = FORECAST_PYTHON) -> list[Answer]:
    """Every job in one probe process."""
    raw = run_probe([job.as_dict() for job in jobs], python)
    return [Answer.parse(item, str(item["aiconfigurator"])) for item in raw]
