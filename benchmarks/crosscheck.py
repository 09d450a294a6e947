"""Do our figures agree with `vllm bench serve`? Both tools load the same server AT THE SAME TIME,
each at the same concurrency with its own half of one workload (same lengths and sampling), so a
stall of the server (vLLM on 2 CPU cores has them: whole batches delivered late) hits both alike;
run one after the other, the noise between runs is larger than the tolerance. Our requests are
kept only while `vllm bench serve` was sending (perf_counter is CLOCK_MONOTONIC, shared by both
processes). It prints both tools' medians side by side and how far apart they are: a benchmark,
not a verdict (two load generators timing one CPU vLLM on two shared cores differ by more than
any definition does). Whether both tools define TTFT, TPOT, ITL and E2E latency alike is tested
deterministically: tests/benchmarks/test_crosscheck.py runs this against the scripted upstream,
which paces every stream to a known truth.

Side by side the tools also race: vLLM prefills first come, first served, and when requests of
both finish in the same engine step the client that sends its next request sooner is prefilled
first. Ours does (vllm bench serve does more per request), so at 2 requests each theirs read TTFT
14-30 ms higher on the tiny model; delaying ours by 5 ms turned that round (ours 17 ms higher).
At one request each (the default) such collisions are rare. Each run draws fresh prompts (the
seed is printed; --seed repeats it): a repeat against the same server is served from vLLM's
prefix cache and measures a shorter prefill than a first run.

    python -m benchmarks crosscheck --base-url http://127.0.0.1:8100 --model tiny-qwen3 [--output FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.client import Endpoint
from benchmarks.records import RequestRecord
from benchmarks.runner import BenchConfig, BenchError, build_workload, resolve_model, tokenizer_source
from benchmarks.stats import distribution, summarize

# Explicit and identical on both sides: vllm bench serve would otherwise send temperature 0.
SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
WARMUPS = 4
# The medians compared, as named in both tools' results.
FIGURES = ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms")


async def side_by_side(args: argparse.Namespace, endpoint: Endpoint, our_bodies: list[dict[str, Any]],
                       their_argv: list[str]) -> tuple[list[RequestRecord], int, str]:
    """Start `vllm bench serve`; once it warms up, run our closed loop until it exits."""
    process = await asyncio.create_subprocess_exec(*their_argv, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    stderr_task = asyncio.ensure_future(process.stderr.read())
    # Its startup (importing vLLM) takes seconds; ours joins when its warm-up begins.
    while line := await process.stdout.readline():
        if line.startswith((b"Warming up", b"Starting main benchmark run")):
            break
    rest = asyncio.ensure_future(process.stdout.read())
    records = await loadgen.run(endpoint, our_bodies, loadgen.Pattern(concurrency=args.concurrency),
                                stop=rest.done)
    await rest
    await process.wait()
    return records, process.returncode or 0, (await stderr_task).decode(errors="replace")


def their_argv(args: argparse.Namespace, model: str, tokenizer: str, dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.vllm_bench", "--backend", "openai-chat",
            "--endpoint", "/v1/chat/completions", "--base-url", args.base_url, "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--custom-output-len", str(args.output_len), "--skip-chat-template", "--disable-shuffle",
            "--num-prompts", str(args.num_requests), "--max-concurrency", str(args.concurrency),
            "--request-rate", "inf", "--ignore-eos", "--num-warmups", str(WARMUPS),
            "--temperature", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"]),
            "--top-k", str(SAMPLING["top_k"]), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name,
            "--disable-tqdm"]


def main(args: argparse.Namespace) -> int:
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    model, profile = resolve_model(base_url, args.model, None)
    tokenizer = tokenizer_source(args.model, args.tokenizer, profile)
    seed = random.SystemRandom().randrange(1 << 31) if args.seed is None else args.seed
    config = BenchConfig(base_url=base_url, model=model, input_len=args.input_len, output_len=args.output_len,
                         tokenizer=tokenizer, sampling=SAMPLING, calibrate=False, seed=seed)
    # Their half, then ours: distinct prompts (no prefix-cache hits between the tools), same lengths.
    # Ours gets more prompts than it can send in their time, never repeated: a repeat would hit
    # the prefix cache and lower our TTFT.
    specs = build_workload(config, profile, args.num_requests * 4)
    theirs, mine = specs[: args.num_requests], specs[args.num_requests:]
    bodies = [spec.body(model, "chat", True, SAMPLING) for spec in mine]
    endpoint = Endpoint(base_url, model)
    # Warm both request shapes up before measuring (the first batches on a fresh server are slow).
    warmup, bodies = bodies[: WARMUPS * args.concurrency], bodies[WARMUPS * args.concurrency:]
    asyncio.run(loadgen.run(endpoint, warmup, loadgen.Pattern(concurrency=args.concurrency)))

    with tempfile.TemporaryDirectory(prefix="crosscheck-") as tmp:
        dataset = Path(tmp) / "prompts.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": s.messages[0]["content"]}) + "\n"
                                   for s in theirs if s.messages))
        out = Path(tmp) / "vllm-bench.json"
        records, code, stderr = asyncio.run(side_by_side(args, endpoint, bodies,
                                                         their_argv(args, model, tokenizer, dataset, out)))
        if code != 0:
            tail = "\n".join(stderr.strip().splitlines()[-5:])
            raise BenchError(f"vllm bench serve failed (exit {code}):\n{tail}")
        their: dict[str, Any] = json.loads(out.read_text())

    # Keep our requests that ran entirely inside their measured window.
    window_start = min(their["start_times"])
    window_end = max(s + lat for s, lat in zip(their["start_times"], their["latencies"], strict=True))
    inside = [r for r in records if r.start >= window_start and r.end is not None and r.start + r.end <= window_end]
    if len(inside) < args.num_requests // 2:
        raise BenchError(f"only {len(inside)} of our requests ran while vllm bench serve did; raise --num-requests")
    ours = summarize(inside)
    # What a tool counting only chunks with visible text would read (the one mismatch this
    # comparison found: TTFT moved whenever vLLM's detokenizer held back a partial character).
    visible = distribution([r.first_answer_time for r in inside if r.first_answer_time is not None])["median"]

    print(f"side by side: {their['completed']} requests by vllm bench serve and {ours['completed']} by us, "
          f"each at concurrency {args.concurrency}, {args.input_len} in / {args.output_len} out tokens, "
          f"{model} at {base_url}, seed {seed}")
    print(f"{'':<20}{'median TTFT ms':>16}{'median TPOT ms':>16}{'median ITL ms':>16}{'median E2EL ms':>16}"
          f"{'p99 TTFT ms':>14}")
    rows = {"ours": ours, "vllm bench serve": their}
    for tool, fig in rows.items():
        print(f"{tool:<20}" + "".join(f"{fig[key]:>16.2f}" for key in FIGURES) + f"{fig['p99_ttft_ms']:>14.2f}")
    for key in FIGURES:
        a, b = ours[key], their[key]
        apart = f"{(a - b) / b:+.1%}" if b else "n/a"
        print(f"{key.removeprefix('median_').removesuffix('_ms').upper()} median: ours {a:.2f} ms, "
              f"vllm bench serve {b:.2f} ms ({apart}, {a - b:+.2f} ms)")
    print(f"ours counting only chunks with visible text: median TTFT {visible:.2f} ms")
    if args.output is not None:
        figures = {tool: {key: fig[key] for key in FIGURES} | {"completed": fig["completed"]}
                   for tool, fig in rows.items()}
        figures["ours"]["median_ttft_visible_text_ms"] = visible
        args.output.write_text(json.dumps({
            "base_url": base_url, "model": model, "seed": seed, "concurrency": args.concurrency,
            "input_len": args.input_len, "output_len": args.output_len, "tools": figures,
        }, indent=2) + "\n")
        print(f"results: {args.output}")
    return 0
