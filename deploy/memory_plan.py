"""GPU memory planning from a model's config.json: weights, KV cache per token, what fits.

Everything is computed from config.json and the profile; GPU sizes are data (configs/gpus.yaml).
The figures are estimates of the same arithmetic vLLM does at start-up (weights, then KV cache
in what is left under gpu_memory_utilization), minus a fixed allowance for activations and CUDA
graphs that vLLM measures by profiling and that cannot be known without a GPU. Where the
profile's engine keeps activations outside that budget (SGLang's --mem-fraction-static), the
allowance must fit in what the budget leaves of the GPU instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.engines.registry import engine_for
from deploy.errors import DeployError
from deploy.paths import CONFIGS_DIR
from deploy.profile import Profile

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Bytes per weight of a quantized linear layer (scales add well under 1%).
QUANT_BYTES = {"fp8": 1.0, "awq": 0.5, "gptq": 0.5, "int4": 0.5, "int8": 1.0}
KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
# Activations, CUDA graphs, NCCL buffers per GPU: vLLM profiles these at start; 2 GiB is a
# typical figure for these model sizes with chunked prefill at 8k batched tokens.
DEFAULT_OVERHEAD_GIB = 2.0


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_gib: float
    aiconfigurator: str | None = None  # the system whose data the forecast uses; None: no data
    nvidia_smi: str | None = None  # a regular expression matching the name nvidia-smi prints


GPU_KEYS = {"memory_gib", "aiconfigurator", "nvidia_smi", "note"}


def load_gpu_types(path: Path = CONFIGS_DIR / "gpus.yaml") -> dict[str, GpuType]:
    data = yaml.safe_load(path.read_text())
    types = {}
    for name, spec in data.items():
        unknown = sorted(set(spec) - GPU_KEYS)
        if unknown or "memory_gib" not in spec:
            problem = f"unknown key(s) {', '.join(unknown)}" if unknown else "no memory_gib"
            raise DeployError(f"{path}: {name}: {problem} (keys: {', '.join(sorted(GPU_KEYS))})")
        types[name] = GpuType(name, float(spec["memory_gib"]), spec.get("aiconfigurator"), spec.get("nvidia_smi"))
    return types


@dataclass(frozen=True)
class ModelShape:
    """What memory planning needs from config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: str
    quant_method: str | None
    # Block-wise quantization's [n, k] block (FP8 checkpoints' weight_block_size), or None.
    weight_block: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        quantization = config.get("quantization_config") or {}
        quant = quantization.get("quant_method")
        block = quantization.get("weight_block_size")
        model_type = config.get("model_type", "")
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
            quant_method=quant,
            weight_block=(int(block[0]), int(block[1])) if block else None,
        )

    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear projections (what quantization shrinks)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp)

    def lora_elements_per_slot(self, rank: int, tensor: int = 1, pipeline: int = 1) -> int:
        """Elements of one LoRA slot on one GPU, as vLLM allocates them (LoRA on, no target filter).

        vLLM wraps every linear layer (q/k/v packed, o, gate/up packed, down), the embeddings and
        the LM head, each with A (rank x input) and B (output x rank) sized for --max-lora-rank
        whatever the adapters target. Column-parallel layers split B's output across tensor
        ranks, row-parallel ones A's input; embeddings and LM head are counted whole on every GPU.
        """
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        column = 3 * self.hidden + (q + 2 * kv) // tensor + 2 * self.hidden + 2 * self.intermediate // tensor
        row = q // tensor + self.hidden + self.intermediate // tensor + self.hidden
        layers = -(-self.layers // pipeline)
        embeddings = 2 * (self.vocab + self.hidden)  # embed_tokens and lm_head
        return rank * (layers * (column + row) + embeddings)

    def other_params(self) -> int:
        """Embeddings, LM head, norms and biases: kept in the model dtype by FP8 checkpoints."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        if self.qk_norm:
            norms += self.layers * 2 * self.head_dim
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return embeddings + norms + bias


@dataclass(frozen=True)
class MemoryPlan:
    profile: str
    gpu: GpuType
    gpus: int
    tensor: int
    pipeline: int
    params: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_token_per_gpu: int
    weight_bytes_per_gpu: int
    usable_bytes_per_gpu: int
    kv_space_per_gpu: int
    max_model_len: int
    overhead_gib: float
    lora_rank: int = 0  # --max-lora-rank; 0: LoRA off
    lora_slots: int = 0  # --max-loras
    lora_bytes_per_slot_per_gpu: int = 0
    gpu_memory_utilization: float = 0.9
    # False: the engine's budget holds weights + KV only (SGLang's --mem-fraction-static), and
    # activations and CUDA graphs live in what it leaves of the GPU; `budget` names that flag.
    activations_in_budget: bool = True
    budget: str = "gpu_memory_utilization"

    @property
    def lora_bytes_per_gpu(self) -> int:
        return self.lora_slots * self.lora_bytes_per_slot_per_gpu

    @property
    def kv_tokens(self) -> int:
        return max(0, self.kv_space_per_gpu) // self.kv_bytes_per_token_per_gpu

    @property
    def full_sequences(self) -> float:
        return self.kv_tokens / self.max_model_len

    @property
    def left_per_gpu(self) -> int:
        """What the budget leaves of each GPU."""
        return int(self.gpu.memory_gib * GIB) - self.usable_bytes_per_gpu

    @property
    def kv_fits(self) -> bool:
        return self.full_sequences >= 1.0

    @property
    def activations_fit(self) -> bool:
        """The activations/CUDA graphs allowance fits where the engine puts it."""
        return self.activations_in_budget or self.left_per_gpu >= self.overhead_gib * GIB

    @property
    def fits(self) -> bool:
        return self.kv_fits and self.activations_fit


def read_shape(profile: Profile) -> ModelShape:
    config_dir = profile.config_dir
    if config_dir is None or not (config_dir / "config.json").is_file():
        raise DeployError(f"{profile.name}: no config.json at {config_dir}; set offline_config in the profile")
    return ModelShape.from_config(json.loads((config_dir / "config.json").read_text()))


def plan_memory(
    profile: Profile, gpu: GpuType, gpus: int, tensor: int | None = None,
    overhead_gib: float = DEFAULT_OVERHEAD_GIB,
) -> MemoryPlan:
    shape = read_shape(profile)
    tensor = tensor or max(1, gpus // profile.parallelism.pipeline)
    pipeline = max(1, gpus // tensor)
    dtype = profile.dtype if profile.dtype != "auto" else shape.dtype
    dtype_bytes = DTYPE_BYTES.get(dtype, 2)
    quant = profile.quantization or shape.quant_method
    linear_bytes = QUANT_BYTES.get(quant, dtype_bytes) if quant else dtype_bytes
    weight_bytes = int(shape.linear_params() * linear_bytes + shape.other_params() * dtype_bytes)
    kv_elem = KV_DTYPE_BYTES.get(profile.kv_cache_dtype, dtype_bytes)
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_elem
    # KV heads split across tensor ranks (replicated when there are fewer heads than ranks);
    # layers split across pipeline stages.
    kv_heads_per_gpu = max(1, shape.kv_heads // tensor)
    layers_per_gpu = -(-shape.layers // pipeline)
    kv_per_token_per_gpu = 2 * layers_per_gpu * kv_heads_per_gpu * shape.head_dim * kv_elem
    engine = engine_for(profile)
    usable = int(gpu.memory_gib * GIB * profile.gpu_memory_utilization)
    weight_per_gpu = weight_bytes // (tensor * pipeline)
    lora_rank = profile.lora.max_rank if profile.lora else 0
    lora_slots = engine.lora_slots(profile.lora.max_loras) if profile.lora else 0
    # vLLM's lora_dtype "auto" is the model's dtype.
    lora_slot = shape.lora_elements_per_slot(lora_rank, tensor, pipeline) * dtype_bytes if profile.lora else 0
    # Activations come out of the budget (vLLM), or out of what it leaves (SGLang: weights + KV pool).
    in_budget = int(overhead_gib * GIB) if engine.budget_holds_activations else 0
    kv_space = usable - weight_per_gpu - in_budget - lora_slots * lora_slot
    return MemoryPlan(
        profile=profile.name, gpu=gpu, gpus=tensor * pipeline, tensor=tensor, pipeline=pipeline,
        params=shape.linear_params() + shape.other_params(), weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_per_token, kv_bytes_per_token_per_gpu=kv_per_token_per_gpu,
        weight_bytes_per_gpu=weight_per_gpu, usable_bytes_per_gpu=usable, kv_space_per_gpu=kv_space,
        max_model_len=profile.max_model_len, overhead_gib=overhead_gib,
        lora_rank=lora_rank, lora_slots=lora_slots, lora_bytes_per_slot_per_gpu=lora_slot,
        gpu_memory_utilization=profile.gpu_memory_utilization,
        activations_in_budget=engine.budget_holds_activations, budget=f"{engine.label}'s {engine.budget_flag}",
    )


def tensor_refusal(shape: ModelShape, tensor: int) -> str | None:
    """Why the engines refuse this tensor size for the model, or None: the rules vLLM and SGLang
    apply when they build it. The attention heads split evenly; the KV heads split evenly or are
    replicated whole (tensor a multiple of them); for a block-quantized (FP8) checkpoint every
    row-parallel layer's input share is a whole number of quantization blocks (both engines'
    `validate_fp8_block_shape`: Qwen3-4B-FP8 on tensor 8 splits 9728 into 1216, not a multiple of 128)."""
    if shape.heads % tensor:
        return f"does not divide the model's {shape.heads} attention heads"
    if shape.kv_heads % tensor and tensor % shape.kv_heads:
        return f"neither divides nor is a multiple of the model's {shape.kv_heads} KV heads"
    if shape.weight_block is not None and tensor > 1:
        block_k = shape.weight_block[1]
        for layer, size in (("down_proj", shape.intermediate), ("o_proj", shape.heads * shape.head_dim)):
            if size % tensor or (size // tensor) % block_k:
                return (f"splits {layer}'s {size} inputs into {size / tensor:g} per GPU, not a whole number of "
                        f"the checkpoint's {block_k}-wide quantization blocks (vLLM and SGLang refuse to load it)")
    return None


def smallest_fit(profile: Profile, gpu: GpuType, limit: int = 64) -> MemoryPlan | None:
    """The fewest GPUs (tensor parallel, sizes the engines accept: tensor_refusal) whose KV cache
    holds a full-length sequence (the activations allowance is per GPU: more do not help)."""
    shape = read_shape(profile)
    for n in range(1, limit + 1):
        if tensor_refusal(shape, n) is None:
            candidate = plan_memory(profile, gpu, n, tensor=n)
            if candidate.kv_fits:
                return candidate
    return None


def largest_utilization(gpu: GpuType, overhead_gib: float) -> float:
    """The highest gpu_memory_utilization (two decimals) that leaves overhead_gib of the GPU, by
    plan_memory's own arithmetic; 0.0 when none does."""
    total = int(gpu.memory_gib * GIB)
    for hundredths in range(99, 0, -1):
        if total - int(gpu.memory_gib * GIB * (hundredths / 100)) >= overhead_gib * GIB:
            return hundredths / 100
    return 0.0


def format_plan(p: MemoryPlan, smallest: MemoryPlan | None) -> str:
    def gib(value: int) -> str:
        return f"{value / GIB:,.1f} GiB"

    def mib(value: int) -> str:
        return f"{value / 1024**2:,.1f} MiB"

    lines = [
        f"profile            {p.profile}",
        f"gpus               {p.gpus} x {p.gpu.name} ({p.gpu.memory_gib} GiB), tensor {p.tensor} x pipeline {p.pipeline}",
        f"parameters         {p.params / 1e9:,.2f} B",
        f"weights            {gib(p.weight_bytes)} total, {gib(p.weight_bytes_per_gpu)} per GPU",
        (f"kv cache / token   {p.kv_bytes_per_token / 1024:,.0f} KiB total, "
         f"{p.kv_bytes_per_token_per_gpu / 1024:,.0f} KiB per GPU"),
        f"usable per GPU     {gib(p.usable_bytes_per_gpu)} ({p.gpu.memory_gib} GiB x gpu_memory_utilization)",
    ]
    if not p.activations_in_budget:
        lines[-1] = (f"usable per GPU     {gib(p.usable_bytes_per_gpu)} ({p.gpu.memory_gib} GiB x "
                     f"gpu_memory_utilization = {p.budget}: weights + KV; {gib(p.left_per_gpu)} left "
                     f"for activations/graphs, {p.overhead_gib} GiB estimated)")
    lora = ""
    if p.lora_slots:
        lines.append(
            f"lora adapters      {mib(p.lora_bytes_per_gpu)} per GPU: {p.lora_slots} slot(s) (max_loras) x "
            f"{mib(p.lora_bytes_per_slot_per_gpu)} (rank {p.lora_rank}, every linear layer + embeddings)"
        )
        lora = " - lora adapters"
    overhead = f" - {p.overhead_gib} GiB activations/graphs estimate" if p.activations_in_budget else ""
    lines += [
        f"kv space per GPU   {gib(p.kv_space_per_gpu)} (usable - weights{lora}{overhead})",
        f"kv capacity        {p.kv_tokens:,} tokens = {p.full_sequences:.2f} sequences of {p.max_model_len:,}",
    ]
    if p.fits:
        lines.append(f"verdict            fits: {int(p.full_sequences)} full-length sequence(s) at once")
        return "\n".join(lines)
    reasons = []
    if not p.kv_fits:
        fix = (
            f"the smallest that fits is {smallest.gpus} x {p.gpu.name} (tensor parallel {smallest.tensor})"
            if smallest else f"no count of {p.gpu.name} up to 64 fits; lower max_model_len or use fp8"
        )
        reasons.append(f"one {p.max_model_len:,}-token sequence: {fix}")
    if not p.activations_fit:
        highest = largest_utilization(p.gpu, p.overhead_gib)
        fix = (f"lower gpu_memory_utilization to {highest:.2f} or less" if highest > 0
               else f"no gpu_memory_utilization leaves that much of a {p.gpu.memory_gib} GiB GPU")
        reasons.append(
            f"the {p.overhead_gib} GiB activations/graphs estimate: gpu_memory_utilization "
            f"{p.gpu_memory_utilization} ({p.budget}) leaves {gib(p.left_per_gpu)} per GPU outside it; {fix} "
            "(or pass --overhead-gib with what you measured)"
        )
    lines.append("verdict            DOES NOT FIT " + "; nor ".join(reasons))
    return "\n".join(lines)
