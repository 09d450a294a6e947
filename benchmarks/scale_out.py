"""Scale-out: a second vLLM joins behind the proxy while conversations run (`benchmarks.routing --scale-out`).

What a KEDA scale-out does: replica a serves alone, users keep starting conversations, and a new
replica b becomes healthy mid-run. The proxy (prefix affinity, a and b configured from the start,
b down until it answers /health) must give b new conversations up to its bounded share, never
every one of them. Each user runs conversations of the multi-turn workload back to back (a new
one as soon as its last ended), so new conversations keep arriving. Figures over the time after
the join, per replica, from each vLLM's own metrics (requests, time_to_first_token_seconds) and
the proxy's live conversations per backend (qwen_proxy_backend_conversations); and the client's
TTFT before and after the join. The joining replica is not warmed up: a replica KEDA adds is cold.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import report
from benchmarks.client import Endpoint, send
from benchmarks.conversation_load import turn_body
from benchmarks.conversations import SHAPES, Script, Shape, build, check_fits
from benchmarks.loadgen import connector
from benchmarks.processes import Cores, Stack, free_port
from benchmarks.records import RequestRecord
from benchmarks.replicas import proxy_config, start_proxy, start_vllm, warm_up
from benchmarks.routing_report import replica_figures, scale_out_table
from benchmarks.runner import BenchError, tokenizer_source
from benchmarks.stats import percentile
from benchmarks.workloads import TokenCounter, WorkloadError
from deploy.loader import load_profile

SERVING, JOINER = "a", "b"
TTFT = "vllm:time_to_first_token_seconds_bucket"
FINISHED = "vllm:request_success_total"
RUNNING = "vllm:num_requests_running"
CONVERSATIONS = "qwen_proxy_backend_conversations"
DECISIONS = "qwen_proxy_routing_decisions_total"
POLL_SECONDS = 0.2  # how often the proxy's /ready is read while waiting for the join


async def _text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
        response.raise_for_status()
        return await response.text()


def engine_values(text: str) -> dict[str, Any]:
    """From a vLLM /metrics text: cumulative TTFT buckets {le: count}, finished requests, running now."""
    buckets: dict[float, float] = {}
    finished = running = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == TTFT:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == FINISHED:
                finished += sample.value
            elif sample.name == RUNNING:
                running += sample.value
    return {"ttft_buckets": buckets, "finished": finished, "running": running}


def proxy_values(text: str, urls: dict[str, str]) -> dict[str, Any]:
    """From the proxy's /metrics: live conversations per replica (by name), decisions per reason."""
    names = {url: name for name, url in urls.items()}
    conversations: dict[str, float] = {}
    decisions: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == CONVERSATIONS and sample.labels.get("backend") in names:
                conversations[names[sample.labels["backend"]]] = sample.value
            elif sample.name == DECISIONS:
                reason = sample.labels.get("reason", "")
                decisions[reason] = decisions.get(reason, 0.0) + sample.value
    return {"conversations": conversations, "decisions": decisions}


async def scrape(session: aiohttp.ClientSession, urls: dict[str, str], proxy: str) -> dict[str, Any]:
    """Every replica's and the proxy's figures at one moment (a replica not up yet reads as zeros)."""
    replicas: dict[str, dict[str, Any]] = {}
    for name, url in urls.items():
        try:
            replicas[name] = engine_values(await _text(session, f"{url}/metrics"))
        except (aiohttp.ClientError, TimeoutError):
            replicas[name] = {}
    proxied = proxy_values(await _text(session, f"{proxy}/metrics"), urls)
    for name, values in replicas.items():
        values["conversations"] = proxied["conversations"].get(name, 0.0)
    return {"replicas": replicas, "decisions": proxied["decisions"]}


async def settled(session: aiohttp.ClientSession, urls: dict[str, str], proxy: str,
                  settle_s: float = 3.0) -> dict[str, Any]:
    """Scrape until the servers' finished counts stop moving: vLLM counts a request just after its
    last byte, so a scrape right at the end would miss the last ones."""
    deadline = time.monotonic() + settle_s
    previous = await scrape(session, urls, proxy)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # polling counters, bounded by settle_s
        current = await scrape(session, urls, proxy)
        if all(current["replicas"][n].get("finished") == previous["replicas"][n].get("finished") for n in urls):
            return current
        previous = current
    return previous


async def converse(session: aiohttp.ClientSession, endpoint: Endpoint, script: Script, shape: Shape,
                   next_conversation: list[int], stop: asyncio.Event, records: list[RequestRecord]) -> None:
    """One user: conversations back to back, each turn after the last one's answer, until `stop`."""
    while not stop.is_set() and next_conversation[0] < len(script.user_turns):
        conversation = next_conversation[0]
        next_conversation[0] += 1
        answers: list[str] = []
        for turn in range(shape.turns):
            if stop.is_set():
                return
            record = RequestRecord(index=len(records), conversation=conversation, turn=turn)
            records.append(record)
            body = turn_body(script, conversation, turn, answers, endpoint.model, endpoint.stream, {})
            await send(session, endpoint, body, record, keep_answer=True)
            if not record.ok:
                break
            answers.append(record.answer or "")


async def sample_peaks(session: aiohttp.ClientSession, urls: dict[str, str], peaks: dict[str, float]) -> None:
    while True:
        for name, url in urls.items():
            try:
                running = engine_values(await _text(session, f"{url}/metrics"))["running"]
            except (aiohttp.ClientError, TimeoutError):
                continue
            peaks[name] = max(peaks.get(name, 0.0), running)
        await asyncio.sleep(0.5)  # a sampling period, not synchronisation


def client_figures(records: list[RequestRecord], since: float | None = None,
                   until: float | None = None) -> dict[str, Any]:
    chosen = [r for r in records if (since is None or r.start >= since) and (until is None or r.start < until)]
    ttfts = [r.ttft for r in chosen if r.ok and r.ttft is not None]
    return {"requests": len(chosen),
            "ttft_p50_ms": percentile(ttfts, 50) * 1000 if ttfts else None,
            "ttft_p99_ms": percentile(ttfts, 99) * 1000 if ttfts else None}


async def scenario(args: argparse.Namespace, stack: Stack, cores: Cores | None, urls: dict[str, str],
                   proxy: str, served: str, script: Script, shape: Shape) -> dict[str, Any]:
    endpoint = Endpoint(proxy, served)
    records: list[RequestRecord] = []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector(), timeout=timeout) as session:
        began = time.perf_counter()
        counter = [0]
        users = [asyncio.create_task(converse(session, endpoint, script, shape, counter, stop, records))
                 for _ in range(args.concurrency)]
        await asyncio.sleep(args.join_after)  # the run's schedule: a alone this long
        started = time.perf_counter() - began
        port = int(urls[JOINER].rsplit(":", 1)[1])
        await asyncio.to_thread(start_vllm, stack, args.profile, JOINER, 1, cores, port,
                                f" after {started:.0f} s of load")
        deadline = time.monotonic() + 60
        while True:  # until the proxy has seen it healthy (its next /health round)
            ready = json.loads(await _text(session, f"{proxy}/ready"))
            if ready["models"][served]["backends"].get(urls[JOINER]) == "up":
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the proxy did not see vLLM {JOINER} healthy within 60 s of its start")
            await asyncio.sleep(POLL_SECONDS)  # polling the proxy's view, bounded by the deadline
        joined = time.perf_counter()
        print(f"vLLM {JOINER} in rotation after {joined - began:.0f} s; {args.after_join:.0f} s more of load",
              flush=True)
        before = await scrape(session, urls, proxy)
        peaks: dict[str, float] = {}
        sampler = asyncio.create_task(sample_peaks(session, urls, peaks))
        await asyncio.sleep(args.after_join)  # the run's schedule: load on both this long
        stop.set()
        await asyncio.gather(*users)
        sampler.cancel()
        after = await settled(session, urls, proxy)
    decisions = {reason: n - before["decisions"].get(reason, 0.0) for reason, n in sorted(after["decisions"].items())}
    return {
        "users": args.concurrency, "shape": shape.as_dict(), "joiner": JOINER, "started_after_s": started,
        "joined_after_s": joined - began, "after_join_s": args.after_join,
        "conversations_started": counter[0],
        "replicas": [replica_figures(name, name == JOINER, before["replicas"][name], after["replicas"][name],
                                     peaks.get(name)) for name in urls],
        "client": {"before": client_figures(records, until=joined), "after": client_figures(records, since=joined),
                   "failed": sum(1 for r in records if not r.ok)},
        "routing_decisions_after_join": {reason: n for reason, n in decisions.items() if n},
    }


def run(args: argparse.Namespace) -> int:
    """The scale-out mode of benchmarks.routing (its arguments); 0, or 2 with an error printed."""
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out = args.results_dir / f"routing-scale-out-{re.sub(r'[^0-9T]', '', created)[:15]}.json"
    profile = load_profile(args.profile)
    base = SHAPES[args.shapes[0]]
    shape = Shape(args.conversations, args.turns, base.system_tokens, base.first_turn_tokens, base.follow_up_tokens,
                  args.output_len)
    seed = random.SystemRandom().randrange(1 << 30) if args.seed is None else args.seed
    print(f"seed {seed} (--seed {seed} repeats these prompts)", flush=True)
    from transformers import AutoTokenizer

    try:
        counter = TokenCounter(AutoTokenizer.from_pretrained(tokenizer_source(args.profile, None, profile)), "chat")
        check_fits(counter, shape, profile.max_model_len)
        script = build(counter, shape, seed)
    except (WorkloadError, BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cores = None
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        stack = Stack(Path(tmp))
        try:
            cores = Cores.plan(sorted(os.sched_getaffinity(0)), 2) if args.bind_cores else None
            serving = (str(args.backend_urls[0]).rstrip("/") if args.backend_urls
                       else start_vllm(stack, args.profile, SERVING, 0, cores))
            urls = {SERVING: serving, JOINER: f"http://127.0.0.1:{free_port()}"}
            if cores is not None:
                os.sched_setaffinity(0, set(cores.client))
            warm_up([urls[SERVING]], profile.served_model_name)
            # Both replicas configured from the start: the joiner is down (not started) until it joins.
            proxy = start_proxy(stack, Path(tmp) / "proxy-scale-out.yaml",
                                proxy_config(args.profile, free_port(), list(urls.values()), "prefix_affinity"))
            summary = asyncio.run(scenario(args, stack, cores, urls, proxy, profile.served_model_name, script, shape))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            stack.stop()
    summary |= {"created": created, "profile": args.profile, "seed": seed, "cores": "bound" if cores else "shared"}
    print()
    print(scale_out_table(summary))
    print(f"results: {report.write_to(summary, out)}")
    return 0
