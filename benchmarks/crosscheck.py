"""Do our figures agree with `vllm bench serve`? The same prompts, server and concurrency, both tools
in alternating rounds (this machine is noisy), median TTFT and TPOT compared within a tolerance.

    python -m benchmarks crosscheck --base-url http://127.0.0.1:8100 --model tiny-qwen3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.client import Endpoint
from benchmarks.runner import BenchConfig, BenchError, build_workload, find_profile, served_models
from benchmarks.stats import summarize

# Explicit and identical on both sides: vllm bench serve would otherwise send temperature 0.
SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
WARMUPS = 4


def ours(endpoint: Endpoint, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    asyncio.run(loadgen.run(endpoint, bodies[:WARMUPS], loadgen.Pattern(concurrency=concurrency)))
    records = asyncio.run(loadgen.run(endpoint, bodies, loadgen.Pattern(concurrency=concurrency)))
    return summarize(records)


def theirs(args: argparse.Namespace, model: str, tokenizer: str, dataset: Path, out_dir: Path,
           round_index: int) -> dict[str, Any]:
    name = f"vllm-bench-{round_index}.json"
    argv = [sys.executable, "-m", "benchmarks.vllm_bench", "--backend", "openai-chat",
            "--endpoint", "/v1/chat/completions", "--base-url", args.base_url, "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--custom-output-len", str(args.output_len), "--skip-chat-template", "--disable-shuffle",
            "--num-prompts", str(args.num_requests), "--max-concurrency", str(args.concurrency),
            "--request-rate", "inf", "--ignore-eos", "--num-warmups", str(WARMUPS),
            "--temperature", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"]),
            "--top-k", str(SAMPLING["top_k"]), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--save-result", "--result-dir", str(out_dir), "--result-filename", name, "--disable-tqdm"]
    completed = subprocess.run(argv, check=False, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-5:])
        raise BenchError(f"vllm bench serve failed (exit {completed.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads((out_dir / name).read_text())
    return result


def main(args: argparse.Namespace) -> int:
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    served = served_models(base_url, None)
    profile = find_profile(args.model)
    model = args.model if args.model in served else (profile.served_model_name if profile else args.model)
    if model not in served:
        raise BenchError(f"model {args.model!r} is not served at {base_url}; it serves: {', '.join(served)}")
    tokenizer = args.tokenizer or (str(profile.model_path or profile.model) if profile else None)
    if tokenizer is None:
        raise BenchError("give --tokenizer for a model without a profile")
    config = BenchConfig(base_url=base_url, model=model, input_len=args.input_len, output_len=args.output_len,
                         tokenizer=tokenizer, sampling=SAMPLING, calibrate=False)
    specs = build_workload(config, profile, args.num_requests)
    bodies = [spec.body(model, "chat", True, SAMPLING) for spec in specs]
    endpoint = Endpoint(base_url, model)

    figures: dict[str, list[dict[str, float]]] = {"ours": [], "vllm bench serve": []}
    with tempfile.TemporaryDirectory(prefix="crosscheck-") as tmp:
        dataset = Path(tmp) / "prompts.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": s.messages[0]["content"]}) + "\n"
                                   for s in specs if s.messages))
        for round_index in range(args.rounds):
            figures["ours"].append(ours(endpoint, bodies, args.concurrency))
            figures["vllm bench serve"].append(theirs(args, model, tokenizer, dataset, Path(tmp), round_index))

    print(f"{args.num_requests} requests x {args.rounds} rounds, concurrency {args.concurrency}, "
          f"{args.input_len} in / {args.output_len} out tokens, {model} at {base_url}")
    print(f"{'':<20}{'median TTFT ms':>16}{'median TPOT ms':>16}{'median ITL ms':>16}{'output tok/s':>14}")
    medians: dict[str, dict[str, float]] = {}
    for tool, rounds in figures.items():
        medians[tool] = {key: statistics.median(r[key] for r in rounds)
                         for key in ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "output_throughput")}
        m = medians[tool]
        print(f"{tool:<20}{m['median_ttft_ms']:>16.2f}{m['median_tpot_ms']:>16.2f}"
              f"{m['median_itl_ms']:>16.2f}{m['output_throughput']:>14.0f}")
    ok = True
    for key, label in (("median_ttft_ms", "median TTFT"), ("median_tpot_ms", "median TPOT")):
        a, b = medians["ours"][key], medians["vllm bench serve"][key]
        diff = abs(a - b) / b if b else float("inf")
        holds = diff <= args.tolerance
        ok &= holds
        print(f"{label}: ours {a:.2f} ms vs vllm bench serve {b:.2f} ms: {diff:.1%} apart "
              f"({'within' if holds else 'OUTSIDE'} {args.tolerance:.0%})")
    return 0 if ok else 1
