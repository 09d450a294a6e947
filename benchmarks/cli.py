"""`python -m benchmarks`: load-test any OpenAI-compatible endpoint, compare results."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks import forecast_compare, report
from benchmarks.conversations import SHAPES
from benchmarks.loadgen import Pattern
from benchmarks.records import RequestRecord
from benchmarks.runner import BenchConfig, BenchError
from benchmarks.server_metrics import split_metrics_url
from benchmarks.stats import parse_slos
from benchmarks.workloads import WORKLOADS

EXAMPLES = """examples:
  python -m benchmarks run --model tiny-qwen3                        # 100 requests, concurrency 8
  python -m benchmarks run --model qwq-32b --workload reasoning --rate 0.5 --num-requests 50
  python -m benchmarks run --model tiny-qwen3 --sweep-rates 2,4,8,16,32 --slo ttft<=2s,tpot<=50ms
  python -m benchmarks run --model tiny --workload multi-turn --conversations 16 --turns 5 \
      --metrics-url a=http://127.0.0.1:8100/metrics --metrics-url b=http://127.0.0.1:8101/metrics
  python -m benchmarks run --model my-model --base-url http://vllm:8000 --tokenizer Qwen/QwQ-32B
  python -m benchmarks compare results/A.json results/B.json
"""


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def rate(text: str) -> float:
    return math.inf if text.strip().lower() == "inf" else positive_float(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def number_list(convert: Any) -> Any:
    def parse(text: str) -> list[Any]:
        return [convert(part) for part in text.split(",") if part.strip()]
    return parse


def sampling(text: str) -> dict[str, Any]:
    """`temperature=0.6,top_p=0.95` -> body fields (values parsed as JSON where they are)."""
    fields: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{part!r}: expected key=value, e.g. temperature=0.6")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    return fields


def metrics_url(text: str) -> str:
    try:
        split_metrics_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def header_name(text: str) -> str:
    name = text.strip().lower()
    if not name or any(c in name for c in " :\t\r\n"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an HTTP header name")
    return name


def slos(text: str) -> Any:
    try:
        return parse_slos(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="OpenAI-compatible server (the proxy, or vLLM directly); default %(default)s")
    target.add_argument("--model", required=True, help="served model name, alias or profile name")
    target.add_argument("--api", choices=["chat", "completions"], default="chat")
    target.add_argument("--no-stream", dest="stream", action="store_false",
                        help="non-streaming requests (no TTFT/ITL figures)")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="Bearer key (default: $OPENAI_API_KEY); never written to results")
    target.add_argument("--metrics-url", action="append", default=[], dest="metrics_urls", type=metrics_url,
                        metavar="[NAME=]URL",
                        help="a /metrics URL to scrape before/during/after (vLLM's, the proxy's); repeatable. "
                             "NAME labels it in the report (default host:port), e.g. a=http://vllm-a:8000/metrics: "
                             "with several vLLM servers the report shows each one's requests and prefix-cache hits")
    target.add_argument("--timeout", type=positive_float, default=600.0, help="per-request seconds")

    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    work.add_argument("--input-len", type=positive_int,
                      help="input tokens, chat template included (default 256; long-context: 100000, capped "
                           "to the profile's max_model_len)")
    work.add_argument("--input-dist", choices=["fixed", "uniform", "normal"], default="fixed")
    work.add_argument("--input-spread", type=float, default=0.0, help="uniform: +-fraction; normal: sd/mean")
    work.add_argument("--output-len", type=positive_int, default=None,
                      help="fixed output tokens (max_tokens + ignore_eos); default 128 for synthetic "
                           "workloads, natural length for reasoning and jsonl")
    work.add_argument("--natural-output", action="store_true", help="no max_tokens/ignore_eos: natural lengths")
    work.add_argument("--output-dist", choices=["fixed", "uniform", "normal"], default="fixed")
    work.add_argument("--output-spread", type=float, default=0.0)
    work.add_argument("--prefix-len", type=positive_int, default=1024, help="shared-prefix: common prefix tokens")
    work.add_argument("--dataset", help="jsonl workload: a JSONL file of prompts/conversations (ShareGPT works)")
    work.add_argument("--tokenizer", help="tokenizer path or HF id (default: the model's profile)")
    work.add_argument("--seed", type=int, default=0)
    work.add_argument("--sampling", type=sampling, default={},
                      help="explicit sampling fields, e.g. temperature=0.6,top_p=0.95 (default: none, "
                           "so each model's defaults apply)")

    multi = p.add_argument_group("multi-turn workload (each turn re-sends the history, answers included)")
    multi.add_argument("--conversations", type=positive_int, default=16, help="default %(default)s")
    multi.add_argument("--turns", type=positive_int, default=5, help="turns per conversation; default %(default)s")
    multi.add_argument("--shape", choices=sorted(SHAPES), default="history",
                       help="history: short system prompt, 500-token first turns, 160-token follow-ups "
                            "(default); long-system: a 1024-token shared system prompt, 128/64-token turns. "
                            "The options below override its lengths")
    multi.add_argument("--system-len", type=positive_int, help="tokens of the shared system prompt")
    multi.add_argument("--first-turn-len", type=positive_int, help="tokens of each conversation's first user turn")
    multi.add_argument("--follow-up-len", type=positive_int, help="tokens of each later user turn")
    multi.add_argument("--session-header", type=header_name,
                       help="send each conversation's id in this header (e.g. x-session-id); default: none")

    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=positive_int, help="fixed concurrency (closed loop); default 8")
    load.add_argument("--rate", type=rate, help="requests/s with Poisson arrivals ('inf': all at once)")
    load.add_argument("--burstiness", type=positive_float, default=1.0,
                      help="gamma shape of arrivals: 1 Poisson, <1 burstier (with --rate)")
    load.add_argument("--max-concurrency", type=positive_int, help="cap in-flight requests under --rate")
    load.add_argument("--sweep-rates", type=number_list(rate), help="comma-separated rates, one run each")
    load.add_argument("--sweep-concurrency", type=number_list(positive_int), help="comma-separated concurrencies")
    load.add_argument("--num-requests", type=positive_int,
                      help="measured requests per load point (default 100; long-context: 4)")
    load.add_argument("--duration", type=positive_float, help="stop issuing requests after this many seconds")
    load.add_argument("--warmup", type=int,
                      help="requests sent first and left out of the figures (default 4; long-context: 1)")
    load.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                      help="skip measuring the client's own ceiling (~2 s)")

    out = p.add_argument_group("output")
    out.add_argument("--slo", type=slos, default=[], help="goodput SLOs, e.g. ttft<=2s,tpot<=50ms")
    out.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR, help="default %(default)s/")
    out.add_argument("--no-plots", dest="plots", action="store_false")
    out.add_argument("--no-progress", dest="progress", action="store_false")

    beside = p.add_argument_group("beside the forecast (closed-loop runs of fixed lengths, on a GPU box)")
    beside.add_argument("--forecast-gpu", metavar="TYPE",
                        help="the server's GPU type from configs/gpus.yaml (default: what nvidia-smi names here; "
                             "none: the comparison is skipped)")
    beside.add_argument("--replicas", type=positive_int,
                        help="replicas serving the model (default: the proxy's healthy backends for it, else 1)")


def patterns(args: argparse.Namespace) -> list[Pattern]:
    chosen = [name for name in ("concurrency", "rate", "sweep_rates", "sweep_concurrency")
              if getattr(args, name) is not None]
    if len(chosen) > 1:
        raise BenchError("choose one of --concurrency, --rate, --sweep-rates, --sweep-concurrency")
    if args.max_concurrency and not (args.rate or args.sweep_rates):
        raise BenchError("--max-concurrency caps --rate/--sweep-rates; with a closed loop use --concurrency")
    if args.sweep_rates:
        return [Pattern(args.max_concurrency, r, args.burstiness) for r in args.sweep_rates]
    if args.sweep_concurrency:
        return [Pattern(c) for c in args.sweep_concurrency]
    if args.rate is not None:
        return [Pattern(args.max_concurrency, args.rate, args.burstiness)]
    return [Pattern(args.concurrency or 8)]


def config_from(args: argparse.Namespace) -> BenchConfig:
    long_context = args.workload == "long-context"
    natural = args.natural_output or (args.output_len is None and args.workload in ("reasoning", "jsonl"))
    shape = SHAPES[args.shape]
    if args.workload == "multi-turn":
        if args.num_requests is not None:
            raise BenchError("--workload multi-turn sends --conversations x --turns requests: drop --num-requests")
        args.num_requests = args.conversations * args.turns
        if args.output_len is None and not natural:
            args.output_len = shape.output_tokens
    return BenchConfig(
        base_url=args.base_url.rstrip("/").removesuffix("/v1"), model=args.model, workload=args.workload,
        api=args.api, stream=args.stream, num_requests=args.num_requests or (4 if long_context else 100),
        duration_s=args.duration, warmup=max(args.warmup if args.warmup is not None else (1 if long_context else 4), 0),
        patterns=patterns(args),
        input_len=args.input_len or (100_000 if long_context else 256),
        input_dist=args.input_dist, input_spread=args.input_spread,
        output_len=None if natural else (args.output_len or 128),
        output_dist=args.output_dist, output_spread=args.output_spread, prefix_len=args.prefix_len,
        dataset=args.dataset, tokenizer=args.tokenizer, sampling=args.sampling, slos=args.slo,
        metrics_urls=args.metrics_urls, api_key=args.api_key, seed=args.seed, calibrate=args.calibrate,
        timeout_s=args.timeout, conversations=args.conversations, turns=args.turns,
        system_len=args.system_len or shape.system_tokens, first_turn_len=args.first_turn_len or shape.first_turn_tokens,
        follow_up_len=args.follow_up_len or shape.follow_up_tokens, session_header=args.session_header,
    )


class Progress:
    """A tqdm bar on stderr, advanced per finished request, showing failures."""

    def __init__(self, total: int, label: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True)
        self.failed = 0

    def update_record(self, record: RequestRecord) -> None:
        if not record.ok:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def cmd_run(args: argparse.Namespace) -> int:
    from benchmarks import runner

    config = config_from(args)
    result = runner.run(config, Progress if args.progress else None)
    result["forecast_comparison"] = beside_forecast(result, config, args)
    path = report.write(result, args.results_dir)
    print(report.table(result))
    print(forecast_compare.table(result["forecast_comparison"]))
    print(f"\nresults: {path}")
    if args.plots:
        from benchmarks import plots

        for plot in plots.write_all(result, path.with_suffix("")):
            print(f"plot:    {plot}")
    return 1 if all(run["completed"] == 0 for run in result["runs"]) else 0


def beside_forecast(result: dict[str, Any], config: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The run's figures beside the forecast for its profile, workload and layout (or why not)."""
    from deploy.loader import load_profile

    profile = load_profile(result["profile"]) if result["profile"] else None
    names = frozenset({result["served_model"], *((profile.served_model_name, *profile.alias_names) if profile else ())})
    return forecast_compare.for_run(result, profile, config.base_url, names, args.forecast_gpu, args.replicas)


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        a, b = report.load(args.a), report.load(args.b)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    print(report.compare(a, b))
    return 0


def cmd_calibrate(_args: argparse.Namespace) -> int:
    from benchmarks import calibrate

    ceiling = calibrate.measure()
    print(f"client ceiling against an instant upstream: {ceiling['max_request_rate']:.0f} req/s, "
          f"{ceiling['max_chunk_rate']:.0f} chunks/s (concurrency {ceiling['concurrency']}, "
          f"{ceiling['tokens_per_request']} tokens per request)")
    return 0


def cmd_crosscheck(args: argparse.Namespace) -> int:
    from benchmarks import crosscheck

    return crosscheck.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a benchmark and write results JSON, table and plots",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    comp = sub.add_parser("compare", help="print deltas between two results JSON files")
    comp.add_argument("a", type=Path)
    comp.add_argument("b", type=Path)
    comp.set_defaults(func=cmd_compare)
    cal = sub.add_parser("calibrate", help="measure this client's own ceiling against an instant upstream")
    cal.set_defaults(func=cmd_calibrate)
    cross = sub.add_parser("crosscheck", help="this tool and `vllm bench serve` at once on one server: "
                                              "their medians side by side")
    cross.add_argument("--base-url", default="http://127.0.0.1:8100")
    cross.add_argument("--model", required=True)
    cross.add_argument("--tokenizer")
    cross.add_argument("--num-requests", type=positive_int, default=96)
    cross.add_argument("--concurrency", type=positive_int, default=1,
                       help="per tool (both run at once; above 1 the tools race for vLLM's prefill)")
    cross.add_argument("--input-len", type=positive_int, default=1024)
    cross.add_argument("--output-len", type=positive_int, default=64)
    cross.add_argument("--seed", type=int, help="the prompts' seed (default: fresh each run, printed)")
    cross.add_argument("--output", type=Path, help="also write both tools' medians to this JSON file")
    cross.set_defaults(func=cmd_crosscheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
