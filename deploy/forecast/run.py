"""`plan --workload`: a profile's throughput on N GPUs of one type, for every layout, as
aiconfigurator models it; and the layout and max_num_seqs to serve.

`prepare` finds the layouts and their KV-bound batches (the memory plan's, deploy/forecast/
layouts.py) and builds the one job that asks aiconfigurator for every batch up to that bound
(deploy/forecast/aic.py); `finish` turns its answer into the forecast, with the batch within the
SLO and the layout that deploy/forecast/choose.py picks. What aiconfigurator needs from the
profile is asked of its engine (`aiconfigurator_backend`), never its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deploy.engines.base import config_dir
from deploy.engines.registry import engine_for
from deploy.errors import DeployError
from deploy.forecast import aic
from deploy.forecast.choose import Row, Target, batches, recommend, row
from deploy.forecast.layouts import Excluded, Layout, layouts
from deploy.memory_plan import DTYPE_BYTES, GpuType, read_shape
from deploy.profile import Profile, Workload


@dataclass(frozen=True)
class Forecast:
    profile: Profile
    gpu: GpuType
    gpus: int
    workload: Workload
    target: Target
    source: aic.Source
    engine_label: str
    engine_version: str | None
    rows: list[Row]
    excluded: list[Excluded]
    recommended: Row | None
    notes: list[str] = field(default_factory=list)


def forecast_gpus(gpu_types: dict[str, GpuType]) -> str:
    return ", ".join(f"{name} ({gpu.aiconfigurator})" for name, gpu in gpu_types.items() if gpu.aiconfigurator)


def _system(gpu: GpuType, gpu_types: dict[str, GpuType]) -> str:
    if gpu.aiconfigurator is None:
        raise DeployError(f"--gpu {gpu.name}: aiconfigurator {aic.pinned_version()} has no data for this GPU; the "
                          f"forecast covers {forecast_gpus(gpu_types)} (configs/gpus.yaml, key aiconfigurator)")
    return gpu.aiconfigurator


def _model_dtype(profile: Profile) -> str:
    shape = read_shape(profile)
    dtype = profile.dtype if profile.dtype != "auto" else shape.dtype
    if profile.quantization is not None and profile.quantization != shape.quant_method:
        raise DeployError(f"{profile.name}: quantization {profile.quantization}: aiconfigurator models the "
                          f"checkpoint's own quantization (config.json: {shape.quant_method or 'none'}), not the "
                          "engine's quantization at load time; forecast a checkpoint that is quantized already")
    if dtype not in DTYPE_BYTES:
        raise DeployError(f"{profile.name}: dtype {dtype}: not a dtype the forecast knows")
    return dtype


def _refusal(answer: aic.Answer, profile: Profile, gpu: GpuType, gpu_types: dict[str, GpuType]) -> DeployError:
    version = aic.pinned_version()
    if answer.error_kind == "no_data":
        ours = [f"{name} ({g.aiconfigurator})" for name, g in gpu_types.items() if g.aiconfigurator in answer.supported]
        return DeployError(f"{profile.name} on {gpu.name}: {answer.error}; GPUs with that data: {', '.join(ours)}")
    if answer.error_kind == "architecture":
        return DeployError(f"{profile.name}: {answer.error} (config.json's architectures); aiconfigurator "
                           f"{version} models: {', '.join(answer.supported)}")
    return DeployError(f"{profile.name}: the forecast probe refused the request: {answer.error}")


def _notes(profile: Profile) -> list[str]:
    """What the figures leave out for this profile."""
    notes = []
    if profile.enable_prefix_caching:
        notes.append("no prefix-cache hits are modelled: prompts that share a prefix get a faster first token")
    if profile.lora is not None:
        notes.append("LoRA adapters are not modelled: requests to an adapter are slower than shown")
    if profile.enforce_eager:
        notes.append("enforce_eager is not modelled (aiconfigurator assumes CUDA graphs): decode is slower than shown")
    return notes


def job_for(profile: Profile, system: str, workload: Workload, points: list[tuple[int, int, list[int]]]) -> aic.Job:
    """What aiconfigurator is asked for this profile: its engine's data, its KV cache dtype (never
    aiconfigurator's guess) and its memory fraction, at these (tensor, pipeline, batches)."""
    return aic.Job(model_dir=config_dir(profile), system=system, backend=engine_for(profile).aiconfigurator_backend,
                   kvcache_quant_mode=aic.kvcache_mode(profile.kv_cache_dtype, _model_dtype(profile)),
                   free_gpu_memory_fraction=profile.gpu_memory_utilization,
                   isl=workload.input, osl=workload.output, layouts=points)


@dataclass(frozen=True)
class Prepared:
    """A forecast before aiconfigurator's answer: its layouts and the one job that asks for them."""

    profile: Profile
    gpu: GpuType
    gpus: int
    workload: Workload
    layouts: list[Layout]
    excluded: list[Excluded]
    job: aic.Job


def prepare(profile: Profile, gpu: GpuType, gpus: int, workload: Workload, gpu_types: dict[str, GpuType],
            overhead_gib: float = 2.0) -> Prepared:
    if profile.device != "cuda":
        raise DeployError(f"{profile.name}: device {profile.device}: the forecast models NVIDIA GPUs; forecast a "
                          "GPU profile")
    system = _system(gpu, gpu_types)
    found, excluded = layouts(profile, gpu, gpus, workload, overhead_gib)
    if not found:
        why = "; ".join(f"tensor {e.tensor} x pipeline {e.pipeline}: {e.reason}" for e in excluded)
        raise DeployError(f"{profile.name}: no layout of {gpus} x {gpu.name} serves it ({why})")
    job = job_for(profile, system, workload, [(lay.tensor, lay.pipeline, batches(lay)) for lay in found])
    return Prepared(profile, gpu, gpus, workload, found, excluded, job)


def finish(prepared: Prepared, answer: aic.Answer, target: Target, gpu_types: dict[str, GpuType]) -> Forecast:
    """The forecast from aiconfigurator's answer to prepared.job; DeployError when it modelled nothing."""
    profile, gpu = prepared.profile, prepared.gpu
    if answer.source is None:
        raise _refusal(answer, profile, gpu, gpu_types)
    rows: list[Row] = []
    excluded = list(prepared.excluded)
    for lay in prepared.layouts:
        key = (lay.tensor, lay.pipeline)
        if key in answer.layout_errors:
            excluded.append(Excluded(lay.tensor, lay.pipeline, f"aiconfigurator cannot model it: {answer.layout_errors[key]}"))
        else:
            rows.append(row(lay, answer.points[key], target))
    if not rows:
        errors = "; ".join(f"tensor {t} x pipeline {p}: {e}" for (t, p), e in answer.layout_errors.items())
        raise DeployError(f"{profile.name} on {gpu.name}: aiconfigurator {answer.source.aiconfigurator} cannot model "
                          f"it with its {answer.source.backend} {answer.source.data_version} data for "
                          f"{answer.source.system}: {errors}")
    engine = engine_for(profile)
    return Forecast(
        profile=profile, gpu=gpu, gpus=prepared.gpus, workload=prepared.workload, target=target,
        source=answer.source, engine_label=engine.label, engine_version=engine.version(), rows=rows,
        excluded=sorted(excluded, key=lambda e: (e.tensor, e.pipeline)), recommended=recommend(rows),
        notes=[*_notes(profile), *answer.notes],
    )
