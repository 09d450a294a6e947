"""`python -m deploy`: render, check, plan and serve model profiles."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deploy import chart
from deploy.engines.registry import engine_for
from deploy.errors import DeployError
from deploy.host import GpuId, gpu_id
from deploy.layout import DEFAULT_PROXY_PORT
from deploy.loader import known_profiles, load_profile
from deploy.memory_plan import GpuType
from deploy.paths import GENERATED_MODELS_DIR
from deploy.profile import Profile, Workload
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


def cmd_check(args: argparse.Namespace) -> int:
    results = []
    for profile in _profiles(args):
        engine = engine_for(profile)
        for name, value in engine.check_log_env.items():
            os.environ.setdefault(name, value)
        effective = engine.check(profile)
        results.append(effective.as_dict())
        if not args.json:
            print(engine.describe(effective), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


PROFILE_WORKLOAD = object()  # `--workload` without a value: the profile's own (not a str: argparse would parse it)


def workload_arg(text: str) -> Workload:
    """`--workload 2000:1000` -> 2,000 tokens in, 1,000 out per request."""
    from pydantic import ValidationError

    from deploy.typed_config import describe_errors

    given, sep, taken = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return Workload(input=int(given), output=int(taken))
    except ValueError as exc:
        detail = f" ({describe_errors(exc)})" if isinstance(exc, ValidationError) else ""
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected IN:OUT tokens per request, IN >= 1 and OUT >= 2, e.g. 2000:1000{detail}") from None


def milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 ms, got {text}")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    from deploy.memory_plan import format_plan, load_gpu_types, plan_memory, smallest_fit

    gpu_types = load_gpu_types()
    if args.gpu not in gpu_types:
        raise DeployError(f"--gpu {args.gpu!r} is not in configs/gpus.yaml; known: {', '.join(gpu_types)}")
    profile = load_profile(args.profile, args.set)
    gpu = gpu_types[args.gpu]
    gpus = args.gpus or profile.parallelism.world_size
    if args.workload is not None:
        return _forecast(args, profile, gpu_types, gpus)
    if args.json or args.ttft_ms is not None or args.tpot_ms is not None:
        raise DeployError("--json, --ttft-ms and --tpot-ms go with the forecast: add --workload IN:OUT (or "
                          "--workload alone for the profile's)")
    result = plan_memory(profile, gpu, gpus, overhead_gib=args.overhead_gib)
    print(format_plan(result, None if result.kv_fits else smallest_fit(profile, gpu)))
    return 0 if result.fits else 1


def _forecast(args: argparse.Namespace, profile: Profile, gpu_types: dict[str, GpuType], gpus: int) -> int:
    """The throughput forecast on `gpus` GPUs; exit 1 when no layout meets the SLO."""
    from deploy.forecast import aic, report
    from deploy.forecast.choose import Target
    from deploy.forecast.run import finish, prepare

    workload = profile.workload if args.workload is PROFILE_WORKLOAD else args.workload
    if workload is None:
        raise DeployError(f"{profile.name} declares no workload: give --workload IN:OUT, e.g. --workload 2000:1000")
    if workload.tokens > profile.max_model_len:
        raise DeployError(f"--workload {workload.input}:{workload.output}: {workload.tokens:,} tokens exceed "
                          f"{profile.name}'s max_model_len {profile.max_model_len:,}, which the engine refuses")
    slo = profile.slo
    target = Target(
        ttft_ms=args.ttft_ms if args.ttft_ms is not None else (slo.ttft_ms if slo else None),
        tpot_ms=args.tpot_ms if args.tpot_ms is not None else (slo.tpot_ms if slo else None),
    )
    prepared = prepare(profile, gpu_types[args.gpu], gpus, workload, gpu_types, args.overhead_gib)
    points = sum(len(batches) for _, _, batches in prepared.job.layouts)
    print(f"modelling {points:,} batch sizes on {len(prepared.layouts)} layout(s) with aiconfigurator "
          "(~10 ms each)...", file=sys.stderr, flush=True)
    result = finish(prepared, aic.estimate([prepared.job])[0], target, gpu_types)
    if args.json:
        print(json.dumps(report.as_json(result, args.profile, args.set), indent=2))
    else:
        print(report.as_text(result, args.profile, args.set))
    return 0 if result.recommended is not None else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from deploy.launch import prepare, release, serve
    from deploy.layout import Ask

    profile = load_profile(args.profile, args.set)
    ask = Ask(replicas=args.replicas, gpus=args.gpus, port=args.port, proxy_port=args.proxy_port,
              no_proxy=args.no_proxy)
    launch = prepare(profile, ask, ray_address=args.ray_address, dry_run=args.dry_run)
    if args.dry_run:
        release(launch)
        for warning in launch.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(json.dumps(launch.layout.as_json(), indent=2) if args.json else launch.layout.describe())
        return 0
    if args.json:
        raise DeployError("--json goes with --dry-run (it prints the layout serve would start)")
    return serve(launch, startup_timeout=args.startup_timeout)


def cmd_status(args: argparse.Namespace) -> int:
    from deploy import run_state

    found = run_state.read_all()
    if args.ports:
        # Where a running serve of that profile put its replicas; else the profile's own port (a
        # vLLM started some other way). For `make bench` and `make observe`, which scrape each one.
        ports = run_state.replica_ports(args.ports, found) or [load_profile(args.ports).port]
        print(" ".join(map(str, ports)))
        return 0
    if args.json:
        print(run_state.dumps(found))
        return 0
    print(run_state.describe(found))
    ray_cli.print_cluster(args.address)
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def gpu_list(text: str) -> tuple[GpuId, ...]:
    """--gpus 0,1,2 (or UUIDs, as CUDA_VISIBLE_DEVICES takes them)."""
    entries = [entry.strip() for entry in text.split(",")]
    if not all(entries):
        raise argparse.ArgumentTypeError(f"{text!r}: GPU ids separated by commas, e.g. 0,1,2,3")
    return tuple(gpu_id(entry) for entry in entries)


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

    p = sub.add_parser("plan", help="GPU memory plan: weights, KV cache, what fits; with --workload, the "
                                    "throughput forecast of every layout (modelled by aiconfigurator)")
    with_profile(p, allow_all=False)
    p.add_argument("--gpu", required=True, help="GPU type from configs/gpus.yaml, e.g. h100-80gb")
    p.add_argument("--gpus", type=int, help="GPU count (default: the profile's tensor x pipeline); the memory "
                                           "plan splits the model over them, the forecast fills them with replicas")
    p.add_argument("--overhead-gib", type=float, default=2.0, help="per-GPU activations/CUDA graphs allowance")
    forecast = p.add_argument_group("throughput forecast (runs aiconfigurator in .cache/forecast-venv)")
    forecast.add_argument("--workload", nargs="?", const=PROFILE_WORKLOAD, type=workload_arg, metavar="IN:OUT",
                          help="tokens in and out per request, e.g. 2000:1000; alone: the profile's workload")
    forecast.add_argument("--ttft-ms", type=milliseconds, help="SLO: time to first token (default: the profile's slo)")
    forecast.add_argument("--tpot-ms", type=milliseconds, help="SLO: time per output token (default: the profile's slo)")
    forecast.add_argument("--json", action="store_true", help="print the forecast as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("serve", help="validate and start vLLM for a profile: replicas over the GPUs, the proxy in front")
    with_profile(p, allow_all=False)
    p.add_argument("--replicas", type=positive_int,
                   help="servers to start (default: as many as the GPUs hold, GPUs / (tensor x pipeline); "
                        "on the CPU 1, and N split the cores)")
    p.add_argument("--gpus", type=gpu_list, metavar="ID,ID,...",
                   help="the GPUs to use, as nvidia-smi numbers them (default: every visible GPU); with "
                        "--dry-run taken as given")
    p.add_argument("--port", type=int, help="the first replica's port (default: the profile's, 8100); "
                                            "replica i listens on port + i")
    proxy = p.add_mutually_exclusive_group()
    proxy.add_argument("--proxy-port", type=int,
                       help=f"the proxy in front of the replicas on this port (default with several replicas: "
                            f"{DEFAULT_PROXY_PORT}; with one: no proxy)")
    proxy.add_argument("--no-proxy", action="store_true", help="no proxy, even with several replicas")
    p.add_argument("--ray-address", help="Ray cluster to join for executor: ray (default: auto)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the checks, print each replica's argv and the proxy's, start nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the layout as JSON")
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="what serve runs here (replicas: GPUs, port, pid, health) and the Ray cluster")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or this node's)")
    p.add_argument("--json", action="store_true", help="what serve runs here, as JSON (no Ray view)")
    p.add_argument("--ports", metavar="PROFILE", help="only the engine ports of PROFILE's replicas, space-separated "
                   "(a running serve's; else the profile's port)")
    p.set_defaults(func=cmd_status)

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
