"""`deploy check` for vLLM profiles: the rendered argv judged by the pinned vLLM's own parser
and model-config code.

No GPU and no weights are needed: vLLM builds its ModelConfig from a directory holding only
config.json (`--skip-tokenizer-init`). The values returned are the ones vLLM computed, not ours.
vLLM is imported here only inside the functions: loading profiles and rendering never pay for it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, NoReturn

from deploy.adapters import ADAPTER_CONFIG
from deploy.engines.base import config_theta
from deploy.errors import CheckError
from deploy.paths import shown
from deploy.profile import Profile


def _first_reason(exc: BaseException) -> str:
    """vLLM's own reason, without pydantic's wrapping and help links."""
    text = str(exc)
    match = re.search(r"Value error, (.*?)(?: \[type=|$)", text, flags=re.DOTALL)
    reason = match.group(1) if match else text.strip().splitlines()[-1] if text.strip() else repr(exc)
    return " ".join(reason.split())


def _parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))

    def error(message: str) -> NoReturn:  # argparse would print usage and exit
        raise CheckError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser


def _check_parser_names(profile: Profile) -> None:
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    known_reasoning = ReasoningParserManager.list_registered()
    if profile.reasoning_parser and profile.reasoning_parser not in known_reasoning:
        raise CheckError(
            f"reasoning_parser: {profile.reasoning_parser!r} is not a reasoning parser of this vLLM; "
            f"known: {', '.join(sorted(known_reasoning))}"
        )
    known_tools = ToolParserManager.list_registered()
    if profile.tool_call_parser and profile.tool_call_parser not in known_tools:
        raise CheckError(
            f"tool_call_parser: {profile.tool_call_parser!r} is not a tool-call parser of this vLLM; "
            f"known: {', '.join(sorted(known_tools))}"
        )


def _check_lora(profile: Profile, namespace: argparse.Namespace, engine: Any, model_config: Any) -> dict[str, Any]:
    """vLLM's LoRAConfig (as EngineArgs builds it), its model check, and each local adapter's
    adapter_config.json through vLLM's own PEFTHelper (rank, unsupported features)."""
    if not engine.enable_lora:
        return {}
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models import supports_lora

    try:
        lora_config = LoRAConfig(
            max_lora_rank=engine.max_lora_rank,
            max_loras=engine.max_loras,
            fully_sharded_loras=engine.fully_sharded_loras,
            lora_dtype=engine.lora_dtype,
            target_modules=engine.lora_target_modules,
            max_cpu_loras=engine.max_cpu_loras if engine.max_cpu_loras and engine.max_cpu_loras > 0 else None,
        )
        lora_config.verify_with_model_config(model_config)
    except Exception as exc:  # noqa: BLE001 - pydantic and value errors from vLLM's config
        raise CheckError(f"{profile.name}: lora: vLLM refused the LoRA config: {_first_reason(exc)}") from None
    model_cls, _ = model_config.registry.resolve_model_cls(model_config.architectures, model_config)
    if not supports_lora(model_cls):
        raise CheckError(f"{profile.name}: lora: vLLM serves no LoRA on this model: "
                         f"{model_cls.__name__} does not support LoRA yet.")
    adapters = []
    by_name = {a.name: (i, a) for i, a in enumerate(profile.lora.adapters if profile.lora else [])}
    for module in namespace.lora_modules or []:
        index, adapter = by_name[module.name]
        key = f"lora.adapters[{index}].source ({module.name})"
        rank = None
        if adapter.path is not None:
            if not (adapter.path / ADAPTER_CONFIG).is_file():
                hint = "run `make tiny-lora`" if adapter.generator else "put the adapter there"
                raise CheckError(f"{profile.name}: {key}: no {ADAPTER_CONFIG} at {adapter.path}: {hint}")
            try:
                helper = PEFTHelper.from_local_dir(module.path, model_config.max_model_len)
                helper.validate_legal(lora_config)
            except (TypeError, ValueError) as exc:
                raise CheckError(f"{profile.name}: {key}: vLLM refused the adapter: {_first_reason(exc)}") from None
            rank = max([helper.r, *helper.rank_pattern.values()])
        adapters.append({"name": module.name, "path": shown(module.path), "base": module.base_model_name,
                         "rank": rank})
    return {
        "lora_max_rank": lora_config.max_lora_rank,
        "lora_max_loras": lora_config.max_loras,
        "lora_max_cpu_loras": lora_config.max_cpu_loras,
        "lora_dtype": str(lora_config.lora_dtype).removeprefix("torch."),
        "lora_adapters": adapters,
    }


def computed(profile: Profile, argv: list[str], config_dir: Path) -> dict[str, Any]:
    """Parse argv (the rendered args against config_dir) with vLLM and build its model config;
    what vLLM computed, under its names; CheckError on a refusal."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    try:
        namespace = _parser().parse_args(argv)
        validate_parsed_serve_args(namespace)
    except CheckError as exc:
        raise CheckError(f"{profile.name}: vLLM rejected the arguments: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckError(f"{profile.name}: vLLM rejected the arguments: {_first_reason(exc)}") from None
    _check_parser_names(profile)
    engine = AsyncEngineArgs.from_cli_args(namespace)
    try:
        model_config = engine.create_model_config()
    except Exception as exc:  # noqa: BLE001 - vLLM raises pydantic, value, type and OS errors here
        raise CheckError(f"{profile.name}: vLLM refused the model config: {_first_reason(exc)}") from None

    lora = _check_lora(profile, namespace, engine, model_config)

    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    log_config = get_uvicorn_log_config(namespace) or {}
    excluded = log_config.get("filters", {}).get("access_log_filter", {}).get("excluded_paths", [])

    hf = model_config.hf_text_config
    rope: dict[str, Any] = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if profile.rope_scaling is not None:
        expected = config_theta(config_dir)
        if expected is not None and theta != expected:
            raise CheckError(
                f"{profile.name}: rope_scaling.rope_theta: vLLM would use {theta} but the model's "
                f"config.json has {expected}; set rope_scaling.rope_theta: {expected}"
            )
    return {
        "max_model_len": model_config.max_model_len,
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "quantization": model_config.quantization,
        "rope_type": str(rope.get("rope_type", "default")),
        "rope_factor": rope.get("factor"),
        "rope_original_max_position_embeddings": rope.get("original_max_position_embeddings"),
        "rope_theta": float(theta) if theta is not None else None,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "executor_backend": str(engine.distributed_executor_backend or "uni"),
        "kv_cache_dtype": str(engine.kv_cache_dtype),
        "reasoning_parser": namespace.reasoning_parser or None,
        "tool_call_parser": namespace.tool_call_parser or None,
        "enable_auto_tool_choice": bool(namespace.enable_auto_tool_choice),
        "access_log_excluded": [str(path) for path in excluded],  # paths vLLM's uvicorn access log filter drops
        # LoRA as vLLM's LoRAConfig holds it (None: --enable-lora not given), and one entry per
        # --lora-modules entry: name, path, base, and rank (None: a hub adapter vLLM checks when it fetches it).
        "lora_max_rank": None, "lora_max_loras": None, "lora_max_cpu_loras": None, "lora_dtype": None,
        "lora_adapters": [],
        **lora,
    }
