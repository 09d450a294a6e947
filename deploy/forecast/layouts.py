"""The layouts a forecast compares on N GPUs: each tensor size the engines accept for the model,
with the profile's pipeline, times the replicas that fill the N GPUs, and the batch its KV cache
holds for the workload (deploy/memory_plan.py's KV tokens per replica // tokens per request).

The tensor sizes are those the engines accept (deploy/memory_plan.py's `tensor_refusal`, which
`plan`'s smallest fit also asks).
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy.errors import DeployError
from deploy.memory_plan import GIB, GpuType, plan_memory, read_shape, tensor_refusal
from deploy.profile import Profile, Workload


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    replicas: int
    kv_max_seqs: int  # requests of the workload's length the replica's KV cache holds at once

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor * self.pipeline


@dataclass(frozen=True)
class Excluded:
    """A layout that fills the GPUs but cannot serve this profile, and why."""

    tensor: int
    pipeline: int
    reason: str


def _memory_refusal(profile: Profile, gpu: GpuType, world: int, tensor: int, workload: Workload,
                    overhead_gib: float) -> tuple[int, str | None]:
    plan = plan_memory(profile, gpu, world, tensor=tensor, overhead_gib=overhead_gib)
    kv_max_seqs = plan.kv_tokens // workload.tokens
    if not plan.kv_fits:
        return kv_max_seqs, (f"does not fit: its KV cache holds {plan.kv_tokens:,} tokens, less than one "
                             f"{profile.max_model_len:,}-token sequence (max_model_len), which the engine "
                             "refuses at start (`plan` says more)")
    if not plan.activations_fit:
        return kv_max_seqs, (f"does not fit: {plan.budget} {profile.gpu_memory_utilization} leaves "
                             f"{plan.left_per_gpu / GIB:.1f} GiB per GPU for the {overhead_gib} GiB of "
                             "activations (`plan` says more)")
    if kv_max_seqs < 1:
        return kv_max_seqs, (f"its KV cache holds {plan.kv_tokens:,} tokens, less than one request of "
                             f"{workload.tokens:,}")
    return kv_max_seqs, None


def layouts(profile: Profile, gpu: GpuType, gpus: int, workload: Workload,
            overhead_gib: float) -> tuple[list[Layout], list[Excluded]]:
    """Every layout that fills `gpus` GPUs, smallest tensor first, and the ones refused."""
    pipeline = profile.parallelism.pipeline
    if gpus < pipeline:
        raise DeployError(f"{profile.name}: parallelism.pipeline {pipeline} needs at least {pipeline} GPUs; "
                          f"--gpus is {gpus}")
    shape = read_shape(profile)
    found: list[Layout] = []
    excluded: list[Excluded] = []
    for tensor in range(1, gpus // pipeline + 1):
        world = tensor * pipeline
        if gpus % world:
            continue  # leaves GPUs idle: not a layout of these GPUs
        reason = tensor_refusal(shape, tensor)
        kv_max_seqs = 0
        if reason is None:
            kv_max_seqs, reason = _memory_refusal(profile, gpu, world, tensor, workload, overhead_gib)
        if reason is None:
            found.append(Layout(tensor, pipeline, gpus // world, kv_max_seqs))
        else:
            excluded.append(Excluded(tensor, pipeline, reason))
    return found, excluded
