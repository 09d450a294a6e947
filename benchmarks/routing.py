"""Does routing keep conversations on the replica that cached them? One server against two behind
the proxy, on vLLM's own prefix-cache counters.

    python -m benchmarks.routing [--policies least_in_flight prefix_affinity] [--shapes history long-system]
    python -m benchmarks.routing --scale-out [--join-after 20] [--after-join 60] [--concurrency 16]

Starts two vLLM servers (`python -m deploy serve <profile> --port P`; --backend-url uses running
ones instead) and one proxy per setup (`python -m serving --config <generated file>`): one with
server a alone, and one per routing policy with a and b. Then, per workload shape, runs the
multi-turn workload (benchmarks/conversations.py) through each proxy, each run on fresh prompts
(a new seed: vLLM keeps what it cached in earlier runs), scraping every vLLM's /metrics, and prints
side by side: the prefix-cache hit rate over the servers, requests per server and max / mean,
TTFT p50 / p99, the proxy's routing decisions by reason, and issue 14's targets on the
history-dominated shape. Results: one JSON per run and a summary under --results-dir.

--scale-out runs another comparison instead (benchmarks/scale_out.py): a second vLLM joins while
users run conversations through one proxy, and the joining replica's figures are printed against
the one that served alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.conversations import SHAPES, Shape
from benchmarks.loadgen import Pattern
from benchmarks.processes import Cores, Stack, cpu_list, free_port
from benchmarks.replicas import proxy_config, start_proxy, start_vllm, warm_up
from benchmarks.routing_report import POLICIES, SINGLE, row, side_by_side, targets
from benchmarks.runner import BenchConfig, BenchError
from benchmarks.runner import run as run_benchmark
from benchmarks.scale_out import run as scale_out
from deploy.loader import load_profile

BACKEND_NAMES = ("a", "b")


def start_backends(stack: Stack, profile: str, given: list[str], cores: Cores | None) -> list[str]:
    """Base URLs of two vLLM servers: the given ones, then as many started as are missing."""
    urls = [url.rstrip("/") for url in given]
    while len(urls) < len(BACKEND_NAMES):
        urls.append(start_vllm(stack, profile, BACKEND_NAMES[len(urls)], len(urls), cores))
    return urls


def start_proxies(stack: Stack, config_dir: Path, profile: str, backends: list[str],
                  policies: list[str]) -> dict[str, str]:
    """Setup name -> the base URL of its proxy."""
    setups: dict[str, tuple[list[str], str | None]] = {SINGLE: (backends[:1], None)}
    setups |= {policy: (backends, policy) for policy in policies}
    return {name: start_proxy(stack, config_dir / f"proxy-{name.replace(' ', '-')}.yaml",
                              proxy_config(profile, free_port(), urls, policy))
            for name, (urls, policy) in setups.items()}


def bench_config(args: argparse.Namespace, shape: Shape, base_url: str, metrics: list[str], seed: int) -> BenchConfig:
    return BenchConfig(
        base_url=base_url, model=args.profile, workload="multi-turn", output_len=shape.output_tokens,
        patterns=[Pattern(concurrency=args.concurrency)], seed=seed, calibrate=False,
        metrics_urls=metrics, conversations=shape.conversations, turns=shape.turns,
        system_len=shape.system_tokens, first_turn_len=shape.first_turn_tokens,
        follow_up_len=shape.follow_up_tokens, session_header=args.session_header, warmup=args.warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="two-server setups, one per routing policy (default: both)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["history", "long-system"])
    parser.add_argument("--conversations", type=int,
                        help="per run (default 16; with --scale-out, the most the users may start: 1000)")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--concurrency", type=int,
                        help="turns in flight (default 8; with --scale-out, users running conversations: 16)")
    parser.add_argument("--output-len", type=int, default=64, help="tokens per answer (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=4, help="single-turn requests before each run")
    parser.add_argument("--seed", type=int, help="first run's seed, +1 per run (default: fresh, printed)")
    parser.add_argument("--profile", default="tiny-qwen3", help="model profile of the servers (default %(default)s)")
    parser.add_argument("--backend-url", action="append", default=[], dest="backend_urls",
                        help="a running vLLM server to use as a (then b) instead of starting one; repeatable")
    parser.add_argument("--no-bind-cores", dest="bind_cores", action="store_false",
                        help="let the started vLLM servers, the proxies and the load generator share every "
                        "core (default: kept apart, see benchmarks/processes.py's Cores)")
    parser.add_argument("--session-header", help="send each conversation's id in this header, e.g. x-session-id")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    scale = parser.add_argument_group("scale-out", "a second vLLM joins mid-run (KEDA adding a replica)")
    scale.add_argument("--scale-out", action="store_true",
                       help="run the scale-out comparison instead: vLLM b starts while users run conversations "
                       "through one proxy (prefix_affinity, the first of --shapes)")
    scale.add_argument("--join-after", type=float, default=20.0,
                       help="seconds of load on a alone before b is started (default %(default)s)")
    scale.add_argument("--after-join", type=float, default=60.0,
                       help="seconds of load once the proxy has b in rotation (default %(default)s)")
    args = parser.parse_args(argv)
    if args.conversations is None:
        args.conversations = 1000 if args.scale_out else 16
    if args.concurrency is None:
        args.concurrency = 16 if args.scale_out else 8
    if min(args.conversations, args.turns, args.concurrency, args.output_len) < 1 or args.warmup < 0:
        parser.error("--conversations, --turns, --concurrency and --output-len must be >= 1, --warmup >= 0")
    if len(args.backend_urls) > len(BACKEND_NAMES):
        parser.error(f"at most {len(BACKEND_NAMES)} --backend-url")
    if args.scale_out:
        if len(args.backend_urls) > 1:
            parser.error("--scale-out starts the joining vLLM itself: at most one --backend-url (a)")
        if args.join_after < 0 or args.after_join <= 0:
            parser.error("--join-after must be >= 0 and --after-join > 0")
        return scale_out(args)
    seed = random.SystemRandom().randrange(1 << 30) if args.seed is None else args.seed
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out_dir = args.results_dir / f"routing-{re.sub(r'[^0-9T]', '', created)[:15]}"
    summary: dict[str, Any] = {"created": created, "profile": args.profile, "first_seed": seed,
                               "concurrency": args.concurrency, "shapes": {}}
    print(f"seeds from {seed} (one per run; --seed {seed} repeats these prompts)", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        stack = Stack(Path(tmp))
        try:
            cores = Cores.plan(sorted(os.sched_getaffinity(0)), len(BACKEND_NAMES)) if args.bind_cores else None
            backends = start_backends(stack, args.profile, args.backend_urls, cores)
            if cores is not None:  # this process and the proxies it starts: off the servers' cores
                print(f"proxies and load generator on CPU {cpu_list(cores.client)}", flush=True)
                os.sched_setaffinity(0, set(cores.client))
            warm_up(backends, load_profile(args.profile).served_model_name)
            proxies = start_proxies(stack, Path(tmp), args.profile, backends, args.policies)
            summary["backends"] = dict(zip(BACKEND_NAMES, backends, strict=True))
            engine_metrics = [f"{n}={url}/metrics" for n, url in zip(BACKEND_NAMES, backends, strict=True)]
            for shape_name in args.shapes:
                base = SHAPES[shape_name]
                shape = Shape(args.conversations, args.turns, base.system_tokens, base.first_turn_tokens,
                              base.follow_up_tokens, args.output_len)
                rows = []
                for setup, url in proxies.items():
                    metrics = engine_metrics[:1] if setup == SINGLE else engine_metrics
                    config = bench_config(args, shape, url, [*metrics, f"proxy={url}/metrics"], seed)
                    seed += 1
                    print(f"{shape_name}: {setup} (seed {config.seed})", flush=True)
                    result = run_benchmark(config)
                    path = report.write_to(result, out_dir / f"{shape_name}-{setup.replace(' ', '-')}.json")
                    rows.append(row(setup, result, str(path)))
                summary["shapes"][shape_name] = {"shape": shape.as_dict(), "setups": rows}
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            stack.stop()

    print()
    for shape_name, data in summary["shapes"].items():
        print(side_by_side(shape_name, Shape(**data["shape"]), args.concurrency, data["setups"]))
        if shape_name == "history":
            data["targets"] = targets(data["setups"])
            print("\n".join(data["targets"]))
        print()
    print(f"results: {report.write_to(summary, out_dir / 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
