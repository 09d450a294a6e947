"""Model profiles: one YAML file per deployable model, parsed once into typed objects.

Every other component (launcher, proxy, chart, benchmarks) reads a `Profile`, never the raw
YAML. Unknown keys are errors: a typo in a profile must not be silently ignored. This module is
the data and its own field rules only: it imports no engine. Reading a file, `--set` overrides,
the engine's refusals and the adapters' own configs are deploy/loader.py's.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from deploy.paths import CONFIGS_DIR, is_hub_id, is_local, local_dir
from deploy.typed_config import Strict

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
# What the proxy's health checks, Kubernetes probes and Prometheus poll on every vLLM server.
POLLED_PATHS = ("/health", "/metrics")
# The ranks vLLM 0.32's LoRAConfig accepts for max_lora_rank (vllm.config.lora.MaxLoRARanks);
# tests/deploy/test_lora_check.py holds this to the pinned vLLM's list.
MaxLoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
MAX_LORA_RANKS: tuple[int, ...] = get_args(MaxLoraRank)


class RopeScaling(Strict):
    """Static YaRN: vLLM applies the factor whatever the input length."""

    type: Literal["yarn"] = Field(description="RoPE scaling method; vLLM supports static YaRN.")
    factor: float = Field(gt=1.0, description="Context extension factor, e.g. 4.0.")
    original_max_position_embeddings: int = Field(gt=0, description="Context the model was trained on.")
    rope_theta: float = Field(
        gt=0,
        description="The model's RoPE base. Required: vLLM replaces the whole rope dict, so an "
        "override without it silently drops the model's theta. `deploy check` compares it "
        "with config.json.",
    )

    @property
    def scaled_length(self) -> int:
        return int(self.factor * self.original_max_position_embeddings)


class Parallelism(Strict):
    tensor: int = Field(default=1, ge=1, description="Tensor parallel size (GPUs per model replica stage).")
    pipeline: int = Field(default=1, ge=1, description="Pipeline parallel size (stages, usually one per node).")
    executor: Literal["mp", "ray"] = Field(
        default="mp", description="vLLM distributed executor: mp (one node) or ray (one or more nodes)."
    )
    gpus_per_node: int | None = Field(
        default=None, ge=1, description="GPUs on each node; defaults to tensor x pipeline (one node)."
    )

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline

    @model_validator(mode="after")
    def _fits_nodes(self) -> Parallelism:
        per_node = self.gpus_per_node or self.world_size
        if self.executor == "mp" and self.world_size > per_node:
            raise ValueError(
                f"tensor x pipeline = {self.world_size} GPUs but gpus_per_node = {per_node}: "
                "the mp executor runs on one node; use executor: ray to span nodes"
            )
        return self


class SamplingDefaults(Strict):
    """Request fields the proxy fills in when the client did not send them."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0 disables top-k.")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, description="Used when the client sends none.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Merged key by key with the client's chat_template_kwargs."
    )

    def as_request_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    @cached_property
    def filled(self) -> dict[str, Any]:
        """`as_request_fields()` once: the proxy fills these on every request (read, never changed)."""
        return self.as_request_fields()


class Sampling(Strict):
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    max_tokens_cap: int | None = Field(
        default=None, ge=1, description="Requests asking for more output tokens are capped to this."
    )
    greedy: Literal["allow", "warn", "reject"] = Field(
        default="allow",
        description="What to do with temperature 0 (greedy), which makes Qwen reasoning models repeat.",
    )


class Alias(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    sampling: Sampling | None = Field(default=None, description="A preset for this alias (replaces the profile's).")


class Adapter(Strict):
    """A LoRA adapter served on the profile's model under its own model name."""

    name: str = Field(pattern=NAME_PATTERN, description="The model name clients send for this adapter.")
    source: str = Field(
        min_length=1,
        description="Hugging Face hub id or a local directory (relative to the repo) holding "
        "adapter_config.json and the adapter weights, like the profile's model.",
    )
    sampling: Sampling | None = Field(
        default=None, description="A preset for this adapter (replaces the profile's); absent: the profile's."
    )
    generator: Literal["tiny-lora"] | None = Field(
        default=None, description="The adapter is generated locally by `python -m deploy tiny-lora`."
    )

    @field_validator("source")
    @classmethod
    def _hub_id_or_path(cls, value: str) -> str:
        if not (is_local(value) or is_hub_id(value)):
            raise ValueError(f"{value!r} is neither a hub id (org/name) nor a local directory: "
                             f"write a directory inside the repository as ./{value}")
        return value

    @property
    def path(self) -> Path | None:
        """The local adapter directory, or None for a hub id."""
        return local_dir(self.source) if self.generator or is_local(self.source) else None


class Lora(Strict):
    """LoRA adapters on the profile's model: vLLM's --enable-lora and its limits."""

    max_rank: MaxLoraRank = Field(
        default=16, description="--max-lora-rank: the largest adapter rank served; vLLM sizes every slot for it."
    )
    max_loras: int = Field(default=1, ge=1, description="--max-loras: adapters on the GPU at once (slots).")
    max_cpu_loras: int | None = Field(
        default=None, ge=1, description="--max-cpu-loras: adapters cached in CPU memory (vLLM: max_loras)."
    )
    adapters: list[Adapter] = Field(min_length=1, description="The adapters, each served under its name.")

    @model_validator(mode="after")
    def _consistent(self) -> Lora:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras {self.max_cpu_loras} is below max_loras {self.max_loras} (vLLM refuses it: "
                "adapters on the GPU are also held in CPU memory); raise max_cpu_loras or leave it out"
            )
        names = [adapter.name for adapter in self.adapters]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"adapters repeat the name(s) {', '.join(repeated)}: each adapter needs its own name")
        return self


class Workload(Strict):
    """The traffic a profile is sized for: what `plan --workload` forecasts and max_num_seqs assumes."""

    input: int = Field(ge=1, description="Prompt tokens per request, chat template included.")
    output: int = Field(ge=2, description="Generated tokens per request, reasoning included.")

    @property
    def tokens(self) -> int:
        return self.input + self.output


class Slo(Strict):
    """The latency each request should see at the profile's max_num_seqs (the forecast's target)."""

    ttft_ms: float = Field(gt=0, description="Time to first token, milliseconds.")
    tpot_ms: float = Field(gt=0, description="Time per output token after the first, milliseconds.")


class Profile(Strict):
    """One deployable model: the single source of truth for engine args and serving defaults."""

    name: str = Field(pattern=NAME_PATTERN, description="Profile name; equals the file name without .yaml.")
    description: str = ""
    engine: Literal["vllm", "sglang"] = Field(
        default="vllm", description="The serving engine the profile renders for: vLLM or SGLang (GPU only)."
    )
    model: str = Field(min_length=1, description="Hugging Face hub id or a local directory (relative to the repo).")
    served_model_name: str = Field(pattern=NAME_PATTERN, description="The model name clients send.")
    aliases: list[Alias | str] = Field(default_factory=list)
    offline_config: str | None = Field(
        default=None,
        description="Directory under configs/ holding the model's config.json, for validating "
        "and planning without the weights.",
    )
    generator: Literal["tiny-qwen3"] | None = Field(
        default=None, description="The model is generated locally by `python -m deploy tiny-model`."
    )
    device: Literal["cuda", "cpu"] = "cuda"
    port: int = Field(default=8100, ge=1, le=65535)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(gt=0)
    rope_scaling: RopeScaling | None = None
    quantization: str | None = Field(default=None, description="None: vLLM detects it from config.json.")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    parallelism: Parallelism = Field(default_factory=Parallelism)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    access_log_exclude: list[str] = Field(
        default_factory=lambda: list(POLLED_PATHS),
        description="Paths vLLM's access log leaves out: /health and /metrics are polled every few seconds "
        "(the proxy's health checks, Kubernetes probes, Prometheus). [] logs every request.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment for the engine's process.")
    engine_args: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict,
        description="Any other flag of the engine, without the leading dashes. true -> bare flag, "
        "false/null -> omitted. A flag the profile's own keys render is refused: set the key.",
    )
    sampling: Sampling = Field(default_factory=Sampling)
    lora: Lora | None = Field(default=None, description="LoRA adapters served on this model (none: LoRA off).")
    workload: Workload | None = Field(
        default=None, description="Tokens in and out per request that `plan --workload` forecasts by default."
    )
    slo: Slo | None = Field(
        default=None, description="TTFT and TPOT targets the forecast picks max_num_seqs for; needs workload."
    )

    @field_validator("engine_args")
    @classmethod
    def _flag_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", key):
                raise ValueError(f"engine_args key {key!r} must be a flag name as the engine spells it, without "
                                 "the leading dashes or a value, like 'max-logprobs'")
        return value

    @field_validator("access_log_exclude")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            # vLLM takes them as one comma-separated string and matches each path exactly.
            if not re.fullmatch(r"/[^,\s?#]*", path):
                raise ValueError(f"{path!r} must be a URL path such as /health (no comma, space or query)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        if self.rope_scaling and self.max_model_len > self.rope_scaling.scaled_length:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds what rope_scaling gives "
                f"({self.rope_scaling.factor} x {self.rope_scaling.original_max_position_embeddings} "
                f"= {self.rope_scaling.scaled_length})"
            )
        names = [self.served_model_name, *self.alias_names]
        if len(set(names)) != len(names):
            raise ValueError(f"served_model_name and aliases repeat a name: {names}")
        for i, adapter in enumerate(self.lora.adapters if self.lora else []):
            if adapter.generator == "tiny-lora" and self.generator != "tiny-qwen3":
                raise ValueError(
                    f"lora.adapters[{i}].generator: tiny-lora is made for the tiny model; it needs "
                    "generator: tiny-qwen3 (the tiny model) as the profile's model"
                )
            if adapter.name in names:
                raise ValueError(
                    f"lora.adapters[{i}].name {adapter.name!r} is already the profile's served_model_name or "
                    "an alias: clients could not tell the adapter from the base model; rename the adapter"
                )
        self._defaults_fit_context()
        if self.workload is not None and self.workload.tokens > self.max_model_len:
            raise ValueError(
                f"workload: {self.workload.input} + {self.workload.output} tokens exceed max_model_len "
                f"{self.max_model_len}: the engine would refuse such requests; shorten the workload"
            )
        if self.slo is not None and self.workload is None:
            raise ValueError("slo: a latency target needs the workload it is for: add workload: {input, output}")
        return self

    def _defaults_fit_context(self) -> None:
        """vLLM refuses a request whose max_tokens exceeds max_model_len (it only clamps one that
        fits the context but not beside the prompt), so such a default fails every request that
        leaves max_tokens out."""
        presets = [("sampling.defaults.max_tokens", self.sampling)]
        presets += [(f"aliases[{i}].sampling.defaults.max_tokens ({alias.name})", alias.sampling)
                    for i, alias in enumerate(self.aliases) if isinstance(alias, Alias) and alias.sampling]
        presets += [(f"lora.adapters[{i}].sampling.defaults.max_tokens ({adapter.name})", adapter.sampling)
                    for i, adapter in enumerate(self.lora.adapters if self.lora else []) if adapter.sampling]
        for key, sampling in presets:
            default = sampling.defaults.max_tokens
            if default is not None and default > self.max_model_len:
                raise ValueError(
                    f"{key} {default} exceeds max_model_len {self.max_model_len}: vLLM would refuse every "
                    f"request that sends no max_tokens (\"max_tokens={default} cannot be greater than "
                    f"max_model_len={self.max_model_len}\"); lower {key.split(' ')[0]} to at most "
                    f"{self.max_model_len} (leaving room for the prompt, e.g. {self.max_model_len // 2}) "
                    "or raise max_model_len"
                )

    @property
    def alias_names(self) -> list[str]:
        return [a if isinstance(a, str) else a.name for a in self.aliases]

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters' model names (empty without lora)."""
        return [adapter.name for adapter in self.lora.adapters] if self.lora else []

    def sampling_for(self, name: str) -> Sampling:
        """The sampling preset for a served name, alias or adapter name."""
        for alias in self.aliases:
            if isinstance(alias, Alias) and alias.name == name and alias.sampling is not None:
                return alias.sampling
        for adapter in self.lora.adapters if self.lora else []:
            if adapter.name == name and adapter.sampling is not None:
                return adapter.sampling
        return self.sampling

    @property
    def model_path(self) -> Path | None:
        """The local model directory, or None for a hub id."""
        return local_dir(self.model) if self.generator or is_local(self.model) else None

    @property
    def config_dir(self) -> Path | None:
        """Where this model's config.json is, without downloading anything."""
        if self.model_path is not None:
            return self.model_path
        if self.offline_config:
            return (CONFIGS_DIR / self.offline_config).resolve()
        return None

