"""Parse SGLang launch_server arguments with SGLang's own code and print what it computed, as JSON.

Runs inside the SGLang venv (`make sglang-venv` -> .cache/sglang-venv/bin/python), never in the
project's vLLM venv: it imports only the standard library, SGLang and what SGLang imports.

    .cache/sglang-venv/bin/python deploy/engines/sglang_probe.py --model-path configs/model-configs/qwq-32b \
        --context-length 131072 --skip-tokenizer-init --device cpu
    echo '["--model-path", "...", "--tp-size", "2"]' | .cache/sglang-venv/bin/python deploy/engines/sglang_probe.py
    echo '{"argv": ["--model-path", "..."]}' | .cache/sglang-venv/bin/python deploy/engines/sglang_probe.py

Steps: `sglang.srt.server_args.prepare_server_args(argv)` (SGLang's argparse parser and
ServerArgs.__post_init__ checks), then `ModelConfig.from_server_args` against a model directory
that may hold only config.json (no weights, no tokenizer: pass --skip-tokenizer-init), then
SGLang's own rope resolution (`get_rope_config`, and `get_rope` building the rotary embedding the
model layers would build). Prints one JSON object on stdout: {"ok": true, "server_args": {...},
"model_config": {...}, "rope": {...}}. On a refusal prints {"ok": false, "error": {"stage",
"argument", "type", "message"}} and exits 1 (2 for an unusable probe input). SGLang's own logs
and warnings go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

# Run as a script, Python puts this directory first on sys.path, where deploy/engines/sglang.py
# would shadow SGLang itself (and vllm.py vLLM): drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

# ServerArgs fields worth reporting (the ones the kit's profiles can set, and what SGLang derives
# from them). Fields this SGLang does not have are left out of the output.
SERVER_ARG_FIELDS = (
    "model_path", "served_model_name", "tokenizer_path", "skip_tokenizer_init", "device",
    "context_length", "json_model_override_args", "dtype", "quantization", "kv_cache_dtype",
    "tp_size", "pp_size", "dp_size", "nnodes", "node_rank", "dist_init_addr", "use_ray",
    "mem_fraction_static", "max_running_requests", "max_queued_requests", "max_total_tokens",
    "chunked_prefill_size", "max_prefill_tokens", "enable_mixed_chunk", "page_size",
    "disable_radix_cache", "disable_cuda_graph", "disable_decode_cuda_graph",
    "disable_prefill_cuda_graph", "cuda_graph_backend_decode", "cuda_graph_backend_prefill", "enable_torch_compile", "attention_backend", "sampling_backend",
    "grammar_backend", "reasoning_parser", "tool_call_parser", "host", "port", "api_key",
    "enable_metrics", "uvicorn_access_log_exclude_prefixes", "stream_response_default_include_usage",
    "enable_cache_report", "sampling_defaults", "enable_lora", "lora_paths", "max_lora_rank",
    "lora_target_modules", "max_loras_per_batch", "max_loaded_loras", "lora_backend", "random_seed",
)

# SGLang environment variables that change what the model config accepts.
ENV_THAT_MATTERS = ("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "SGLANG_IS_IN_CI")


class ProbeError(Exception):
    def __init__(self, stage: str, message: str, argument: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.stage, self.message, self.argument, self.kind = stage, message, argument, kind


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "value") and type(value).__module__ != "builtins":  # enums
        return _jsonable(value.value)
    return str(value)


def _read_argv(cli: list[str]) -> list[str]:
    if cli and cli[0] == "--":
        cli = cli[1:]
    if cli:
        return cli
    text = sys.stdin.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError("input", f"stdin is not JSON ({exc}); give the SGLang argv as arguments, "
                         "as a JSON list of strings, or as {\"argv\": [...]}") from None
    argv = data.get("argv") if isinstance(data, dict) else data
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ProbeError("input", "stdin JSON must be a list of strings or {\"argv\": [list of strings]}")
    return argv


@contextlib.contextmanager
def _argparse_raises() -> Iterator[None]:
    """argparse prints usage and exits on a bad argument; turn that into a ProbeError instead."""
    original = argparse.ArgumentParser.error

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        named = re.match(r"argument ([^:]+): ", message)
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        required = re.match(r"the following arguments are required: (.*)", message)
        argument = (named.group(1) if named else required.group(1) if required else None)
        if unknown:  # only the flags, not their values
            argument = " ".join(t for t in unknown.group(1).split() if t.startswith("-")) or unknown.group(1)
        raise ProbeError("server_args", message, argument=argument, kind="ArgumentError")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def _flags_named_in(message: str, argv: list[str], exc: BaseException | None = None) -> str | None:
    """The given flags whose name (or dest) SGLang's message mentions, for errors raised after
    parsing; for a JSON error, the flags whose value looks like JSON and is not."""
    if isinstance(exc, json.JSONDecodeError):
        bad = []
        for flag, value in itertools.pairwise(argv):
            if flag.startswith("--") and value.lstrip()[:1] in ("{", "["):
                try:
                    json.loads(value)
                except json.JSONDecodeError:
                    bad.append(flag)
        return ", ".join(bad) or None
    named = []
    for token in argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            dest = flag[2:].replace("-", "_")
            if flag in message or re.search(rf"\b{re.escape(dest)}\b", message):
                named.append(flag)
    return ", ".join(dict.fromkeys(named)) or None


def _server_args(argv: list[str]) -> Any:
    from sglang.srt.server_args import prepare_server_args

    with _argparse_raises():
        try:
            return prepare_server_args(argv)
        except ProbeError:
            raise
        except SystemExit as exc:  # anything else in SGLang that exits while parsing
            raise ProbeError("server_args", f"SGLang exited with status {exc.code} while parsing",
                             kind="SystemExit") from None
        except Exception as exc:  # noqa: BLE001 - SGLang raises value, type, assertion and OS errors
            message = str(exc) or repr(exc)
            raise ProbeError("server_args", message, argument=_flags_named_in(message, argv, exc),
                             kind=type(exc).__name__) from None


def _model_config(server_args: Any, argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.utils.hf_transformers_utils import get_rope_config

    try:
        config = ModelConfig.from_server_args(server_args)
    except Exception as exc:  # noqa: BLE001 - SGLang raises value, OS and key errors here
        message = str(exc) or repr(exc)
        raise ProbeError("model_config", message, argument=_flags_named_in(message, argv, exc),
                         kind=type(exc).__name__) from None
    hf = config.hf_text_config
    theta, rope_params = get_rope_config(hf)
    head_dim = getattr(config, "head_dim", None) or getattr(hf, "head_dim", None)
    max_positions = getattr(hf, "max_position_embeddings", None)
    model = {
        "architectures": list(getattr(config.hf_config, "architectures", None) or []),
        "context_len": config.context_len,
        "max_position_embeddings": max_positions,
        "dtype": str(config.dtype).removeprefix("torch."),
        "quantization": config.quantization,
        "hf_quantization_config": _jsonable(getattr(config.hf_config, "quantization_config", None)),
        "num_hidden_layers": getattr(hf, "num_hidden_layers", None),
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.get_total_num_kv_heads(),
        "head_dim": head_dim,
        "is_generation": config.is_generation,
    }
    rope: dict[str, Any] = {"rope_theta": theta, "rope_parameters": _jsonable(rope_params)}
    rope.update(_rotary_embedding(head_dim, max_positions, theta, rope_params))
    return model, rope


def _rotary_embedding(head_dim: int | None, max_positions: int | None, theta: float,
                      rope_params: Any) -> dict[str, Any]:
    """The rotary embedding SGLang's Qwen2/Qwen3 attention layers build from these values
    (sglang.srt.layers.rotary_embedding.get_rope), built on the CPU."""
    if not head_dim or not max_positions:
        return {"rotary_embedding": None}
    # Without CUDA, SGLang's rotary embedding takes its CPU-engine path only when
    # SGLANG_USE_CPU_ENGINE=1 (else it imports vLLM's kernels). The flag picks which kernel applies
    # the rotation, not the cos/sin cache; it is set only while the rotary module is imported
    # (sglang.srt.utils.is_cpu caches its answer, hence the cache_clear).
    from sglang.srt.utils import is_cpu

    saved = os.environ.get("SGLANG_USE_CPU_ENGINE")
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    is_cpu.cache_clear()
    try:
        import torch
        from sglang.srt.layers.rotary_embedding import get_rope

        emb = get_rope(head_dim, rotary_dim=head_dim, max_position=max_positions, base=theta,
                       is_neox_style=True, rope_scaling=rope_params, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a backend this machine lacks; report, do not fail
        return {"rotary_embedding": None, "rotary_embedding_error": f"{type(exc).__name__}: {exc}"}
    finally:
        if saved is None:
            del os.environ["SGLANG_USE_CPU_ENGINE"]
        else:
            os.environ["SGLANG_USE_CPU_ENGINE"] = saved
        is_cpu.cache_clear()
    cache = getattr(emb, "cos_sin_cache", None)
    return {"rotary_embedding": {
        "class": type(emb).__name__,
        "scaling_factor": getattr(emb, "scaling_factor", None),
        "max_position_embeddings": getattr(emb, "max_position_embeddings", None),
        "cos_sin_cache_positions": int(cache.shape[0]) if cache is not None else None,
        "mscale": _jsonable(getattr(emb, "mscale", None)),
    }}


def probe(argv: list[str]) -> dict[str, Any]:
    server_args = _server_args(argv)
    fields = {name: _jsonable(getattr(server_args, name)) for name in SERVER_ARG_FIELDS
              if hasattr(server_args, name)}
    model, rope = _model_config(server_args, argv)
    import sglang

    return {
        "ok": True,
        "sglang_version": getattr(sglang, "__version__", None),
        "env": {k: os.environ[k] for k in ENV_THAT_MATTERS if k in os.environ},
        "server_args": fields,
        "model_config": model,
        "rope": rope,
    }


def main(cli: list[str]) -> int:
    out = sys.stdout
    try:
        argv = _read_argv(cli)
        with contextlib.redirect_stdout(sys.stderr):  # SGLang's prints must not mix with the JSON
            result = probe(argv)
        status = 0
    except ProbeError as exc:
        result = {"ok": False, "error": {"stage": exc.stage, "argument": exc.argument,
                                         "type": exc.kind, "message": exc.message}}
        status = 2 if exc.stage == "input" else 1
    json.dump(result, out, indent=2, sort_keys=False)
    out.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
