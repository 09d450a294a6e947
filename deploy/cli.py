"""`python -m deploy`: render, check, plan and serve model profiles."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deploy import chart
from deploy.errors import DeployError
from deploy.paths import GENERATED_MODELS_DIR
from deploy.profile import Profile, known_profiles, load_profile
from deploy.ray import cli as ray_cli


def _profiles(args: argparse.Namespace) -> list[Profile]:
    if getattr(args, "all", False):
        if args.profile:
            raise DeployError("give a profile name or --all, not both")
        return [load_profile(name, args.set) for name in known_profiles()]
    if not args.profile:
        raise DeployError(f"name a profile (or --all); known profiles: {', '.join(known_profiles())}")
    return [load_profile(args.profile, args.set)]


def cmd_render(args: argparse.Namespace) -> int:
    from deploy.render import server_command

    rendered = []
    for profile in _profiles(args):
        command = server_command(profile, port=args.port)
        rendered.append({
            "profile": profile.name,
            "argv": command.argv[3:],  # after `python -m <module>`
            "env": command.env,
            "command": command.argv,
            "shell": command.shell_line(),
        })
    if args.json:
        print(json.dumps(rendered if args.all else rendered[0], indent=2))
    else:
        for item in rendered:
            print(json.dumps(item["command"]))
            print(item["shell"])
    return 0


def _describe_effective(values: dict[str, object]) -> str:
    rope = "none"
    if values["rope_type"] != "default":
        rope = (f"{values['rope_type']} factor {values['rope_factor']} over "
                f"{values['rope_original_max_position_embeddings']}")
    skipped = values["access_log_excluded"]
    rows = [
        ("max_model_len", values["max_model_len"]),
        ("rope scaling", rope),
        ("rope theta", values["rope_theta"]),
        ("dtype", values["dtype"]),
        ("quantization", values["quantization"] or "none"),
        ("kv cache dtype", values["kv_cache_dtype"]),
        ("tensor x pipeline", f"{values['tensor_parallel_size']} x {values['pipeline_parallel_size']}"),
        ("executor", values["executor_backend"]),
        ("reasoning parser", values["reasoning_parser"] or "none"),
        ("tool-call parser", values["tool_call_parser"] or "none"),
        ("auto tool choice", values["enable_auto_tool_choice"]),
        ("access log skips", ",".join(map(str, skipped)) if isinstance(skipped, list) and skipped else "nothing"),
    ]
    if values.get("lora_max_rank") is not None:
        limits = (f"max rank {values['lora_max_rank']}, {values['lora_max_loras']} on the GPU at once, "
                  f"{values['lora_max_cpu_loras']} in CPU memory, dtype {values['lora_dtype']}")
        rows.append(("lora", limits))
        adapters = values.get("lora_adapters")
        for adapter in adapters if isinstance(adapters, list) else []:
            rank = (f"rank {adapter['rank']}" if adapter["rank"] is not None
                    else "a hub id: vLLM checks it when it downloads it")
            rows.append(("adapter", f"{adapter['name']}: {adapter['path']} ({rank}), on {adapter['base']}"))
    return "\n".join(f"  {name:<18} {value}" for name, value in rows)


def _describe_sglang(values: dict[str, object]) -> str:
    rope = "none"
    if values["rope_type"] != "default":
        rope = (f"{values['rope_type']} factor {values['rope_factor']} over "
                f"{values['rope_original_max_position_embeddings']}")
    skipped = values["access_log_excluded_prefixes"]
    rows = [
        ("context length", values["context_length"]),
        ("rope scaling", rope),
        ("rotary embedding", f"{values['rotary_embedding']} ({values['rotary_positions']} positions)"),
        ("rope theta", values["rope_theta"]),
        ("dtype", values["dtype"]),
        ("quantization", values["quantization"] or "none"),
        ("kv cache dtype", values["kv_cache_dtype"]),
        ("tensor x pipeline", f"{values['tensor_parallel_size']} x {values['pipeline_parallel_size']}"),
        ("mem fraction", values["mem_fraction_static"]),
        ("running requests", values["max_running_requests"] or "SGLang's default (from GPU memory)"),
        ("prefill chunk", values["chunked_prefill_size"] or "SGLang's default (from GPU memory)"),
        ("radix cache", values["radix_cache"]),
        ("cuda graphs", values["cuda_graphs"]),
        ("reasoning parser", values["reasoning_parser"] or "none"),
        ("tool-call parser", values["tool_call_parser"] or "none (tool_choice auto: with a parser)"),
        ("metrics", values["enable_metrics"]),
        ("access log skips", " ".join(map(str, skipped)) + " (prefixes)"
         if isinstance(skipped, list) and skipped else "nothing"),
    ]
    if values.get("lora_max_rank") is not None:
        limits = (f"max rank {values['lora_max_rank']}, {values['lora_max_loras_per_batch']} per batch "
                  f"(the base model included), {values['lora_max_loaded_loras'] or 'any'} loaded")
        rows.append(("lora", limits))
        adapters = values.get("lora_adapters")
        for adapter in adapters if isinstance(adapters, list) else []:
            rows.append(("adapter", f"{adapter['name']}: {adapter['path']}"))
    return "\n".join(f"  {name:<18} {value}" for name, value in rows)


def cmd_check(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the result
    from deploy.engines.sglang_check import check_sglang_profile
    from deploy.engines.vllm_check import check_profile

    results = []
    for profile in _profiles(args):
        if profile.engine == "sglang":
            effective = check_sglang_profile(profile).as_dict()
            text = f"{profile.name}: OK (as computed by SGLang {effective['sglang_version']})\n{_describe_sglang(effective)}"
        else:
            effective = check_profile(profile).as_dict()
            text = f"{profile.name}: OK (as computed by vLLM)\n{_describe_effective(effective)}"
        results.append(effective)
        if not args.json:
            print(text, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from deploy.memory_plan import format_plan, load_gpu_types, plan_memory, smallest_fit

    gpu_types = load_gpu_types()
    if args.gpu not in gpu_types:
        raise DeployError(f"--gpu {args.gpu!r} is not in configs/gpus.yaml; known: {', '.join(gpu_types)}")
    profile = load_profile(args.profile, args.set)
    gpu = gpu_types[args.gpu]
    gpus = args.gpus or profile.parallelism.world_size
    result = plan_memory(profile, gpu, gpus, overhead_gib=args.overhead_gib)
    print(format_plan(result, None if result.fits else smallest_fit(profile, gpu)))
    return 0 if result.fits else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from deploy.launch import prepare, release, serve

    profile = load_profile(args.profile, args.set)
    port = args.port or profile.port
    launch = prepare(profile, port=port, ray_address=args.ray_address, generate_model=not args.dry_run)
    if args.dry_run:
        release(launch)
        for warning in launch.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(json.dumps({"argv": launch.command.argv, "env": launch.command.env}, indent=2))
        print(launch.command.shell_line())
        return 0
    return serve(launch, port=port, proxy_port=args.proxy_port, startup_timeout=args.startup_timeout)


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from deploy.tiny.model import generate

    out = generate(args.out, force=args.force)
    print(out)
    return 0


def cmd_tiny_lora(args: argparse.Namespace) -> int:
    from deploy.tiny.lora import generate

    out = generate(args.out, base=args.base, force=args.force)
    print(out)
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    for name in known_profiles():
        profile = load_profile(name)
        print(f"{name:<24} {profile.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_profile(p: argparse.ArgumentParser, allow_all: bool) -> None:
        p.add_argument("profile", nargs="?", help="profile name (configs/models/<name>.yaml) or a .yaml path")
        if allow_all:
            p.add_argument("--all", action="store_true", help="every profile in configs/models")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a profile key, e.g. --set max_model_len=32768 --set parallelism.tensor=4")

    p = sub.add_parser("profiles", help="list the model profiles")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("render", help="print the exact engine argv for a profile (JSON and shell)")
    with_profile(p, allow_all=True)
    p.add_argument("--port", type=int, help="override the profile's port")
    p.add_argument("--json", action="store_true", help="one JSON object (a list with --all)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("check", help="validate with the pinned engine's own parser and model config (vLLM or SGLang)")
    with_profile(p, allow_all=True)
    p.add_argument("--json", action="store_true", help="print the effective values as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="GPU memory plan: weights, KV cache, what fits")
    with_profile(p, allow_all=False)
    p.add_argument("--gpu", required=True, help="GPU type from configs/gpus.yaml, e.g. h100-80gb")
    p.add_argument("--gpus", type=int, help="GPU count (default: the profile's tensor x pipeline)")
    p.add_argument("--overhead-gib", type=float, default=2.0, help="per-GPU activations/CUDA graphs allowance")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("serve", help="validate and start vLLM for a profile")
    with_profile(p, allow_all=False)
    p.add_argument("--port", type=int, help="vLLM port (default: the profile's, 8100)")
    p.add_argument("--proxy-port", type=int, help="also start the proxy in front of vLLM on this port")
    p.add_argument("--ray-address", help="Ray cluster to join for executor: ray (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="run the checks, print the argv, start nothing")
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tiny-model", help="generate the tiny CPU model (no download)")
    p.add_argument("--out", type=Path, default=GENERATED_MODELS_DIR / "tiny-qwen3")
    p.add_argument("--force", action="store_true", help="regenerate even if present")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("tiny-lora", help="generate the tiny model's LoRA adapter with peft (no download)")
    p.add_argument("--out", type=Path, default=GENERATED_MODELS_DIR / "tiny-lora")
    p.add_argument("--base", type=Path, default=GENERATED_MODELS_DIR / "tiny-qwen3",
                   help="the tiny model it is made for (generated first when missing)")
    p.add_argument("--force", action="store_true", help="regenerate even if present")
    p.set_defaults(func=cmd_tiny_lora)

    ray_cli.register(sub)
    chart.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
