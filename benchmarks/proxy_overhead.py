"""What the proxy costs: the same load direct to an upstream, through the proxy, and through a bare
relay on the same server and client libraries (uvicorn + aiohttp: the floor any proxy on them can
reach), side by side.

    python -m benchmarks.proxy_overhead [--concurrency 1 16 64 256] [--seconds 6] [--rounds 2]

Starts a scripted SSE upstream (cheap, paced like vLLM on a GPU: --gap-ms between events, every
running stream's event in the same step as from vLLM's engine, so the proxies' own cost dominates)
and the tiny model on vLLM's CPU build, the upstream on a core of its own and the rest on the
others (benchmarks/processes.py's Cores; --no-bind-cores shares them all), and the proxy and
the bare relay in front of each;
then for every concurrency alternates direct, proxied and bare-relay rounds (the machine is
noisy: rotating the order keeps the ratios fair), each client keeping its connections as real
clients do, and prints added TTFT (p50, p99), tokens/s through each relay as a fraction of direct
(steady state: requests started in each round's first 2 s are not counted), tokens counted from
the servers' usage, events per response (must match: no coalescing), and each relay process's
CPU time per relayed event with the proxy's as a multiple of the bare relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.processes import Cores, Stack, cpu_list, free_port
from deploy.loader import load_profile

TOKENS_PER_REQUEST = 64
RAMP_SECONDS = 2.0


@dataclass
class Cell:
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    events: list[int] = field(default_factory=list)
    busy_seconds: float = 0.0
    errors: int = 0
    relayed_events: int = 0  # every event of the round, ramp included (the relay's CPU covers all)
    proxy_cpu_seconds: float = 0.0

    def merge(self, other: Cell) -> None:
        self.ttfts += other.ttfts
        self.tokens += other.tokens
        self.events += other.events
        self.busy_seconds += other.busy_seconds
        self.errors += other.errors
        self.relayed_events += other.relayed_events
        self.proxy_cpu_seconds += other.proxy_cpu_seconds

    @property
    def cpu_us_per_event(self) -> float:
        return self.proxy_cpu_seconds / self.relayed_events * 1e6 if self.relayed_events else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.busy_seconds if self.busy_seconds else 0.0

    def ttft(self, q: float) -> float:
        if not self.ttfts:
            return float("nan")
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, cell: Cell) -> None:
    start = time.perf_counter()
    first = None
    events = 0
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            if response.status != 200:
                cell.errors += 1
                return
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                events += 1
                # The first token event: vLLM's first event only announces the role.
                if first is None and b'"choices":[{' in line and b'"role":"assistant"' not in line:
                    first = time.perf_counter()
                if b'"usage":{' in line:
                    cell.tokens += json.loads(line[6:])["usage"]["completion_tokens"]
    except aiohttp.ClientError:
        cell.errors += 1
        return
    if first is not None:
        cell.ttfts.append(first - start)
    cell.events.append(events)


def request_body(model: str) -> bytes:
    # The profile's sampling sent explicitly: both paths then ask vLLM for the same work (the proxy
    # would otherwise add top_k/top_p, which cost vLLM more than the proxy itself).
    defaults = load_profile(model).sampling.defaults.as_request_fields()
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "benchmark"}],
                       **defaults, "max_tokens": TOKENS_PER_REQUEST, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()


async def run_round(session: aiohttp.ClientSession, base_url: str, body: bytes, concurrency: int,
                    seconds: float, ramp: float) -> Cell:
    """Closed-loop load; only requests started after the ramp count (the first burst of
    `concurrency` simultaneous requests measures the burst, not the steady state)."""
    counted, ramping = Cell(), Cell()
    url = base_url + "/v1/chat/completions"
    start = time.perf_counter()
    measure_from, deadline = start + ramp, start + ramp + seconds
    last_end = measure_from

    async def worker() -> None:
        nonlocal last_end
        while (began := time.perf_counter()) < deadline:
            await _one(session, url, body, counted if began >= measure_from else ramping)
            if began >= measure_from:
                last_end = max(last_end, time.perf_counter())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    counted.busy_seconds = last_end - measure_from
    counted.relayed_events = sum(counted.events) + sum(ramping.events)
    return counted


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(urls: dict[str, str], pids: dict[str, int], model: str, concurrency: int, seconds: float,
                  rounds: int) -> dict[str, Cell]:
    """Rotate the modes' rounds; each mode keeps one client (keep-alive) throughout."""
    totals = {mode: Cell() for mode in urls}
    body = request_body(model)
    timeout = aiohttp.ClientTimeout(total=600)
    sessions = {mode: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
                for mode in urls}
    try:
        order = list(urls)
        for index in range(rounds):
            for mode in order[index % len(order):] + order[:index % len(order)]:
                pid = pids.get(mode)
                before = cpu_seconds(pid) if pid else 0.0
                cell = await run_round(sessions[mode], urls[mode], body, concurrency, seconds / rounds,
                                       ramp=RAMP_SECONDS)
                if pid:
                    cell.proxy_cpu_seconds = cpu_seconds(pid) - before
                totals[mode].merge(cell)
    finally:
        for session in sessions.values():
            await session.close()
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell and mode")
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/proxy rounds per cell")
    parser.add_argument("--upstreams", nargs="+", choices=["scripted", "vllm"], default=["scripted", "vllm"])
    parser.add_argument("--gap-ms", type=float, default=20.0,
                        help="the scripted upstream's pause between token events (vLLM's pace on a GPU: "
                             "each read then carries one event, as from vLLM); 0 streams as fast as it can")
    parser.add_argument("--pacing", choices=["steps", "streams"], default="steps",
                        help="steps: the scripted upstream's streams share one step clock, as vLLM's engine gives "
                             "every running request a token per step; streams: each stream on its own timer")
    parser.add_argument("--no-bind-cores", dest="bind_cores", action="store_false",
                        help="let the upstream share every core with the relays and the load generator (default: "
                        "the upstream on a core of its own, as vLLM on a GPU box does not run on the proxy's CPU)")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.seconds <= 0 or args.rounds < 1 or args.gap_ms < 0:
        parser.error("concurrency >= 1, seconds > 0, rounds >= 1 and gap-ms >= 0")

    python = sys.executable
    cores = Cores.plan(sorted(os.sched_getaffinity(0)), 1) if args.bind_cores else None
    if cores is not None:  # this process and the relays it starts: off the upstream's core
        os.sched_setaffinity(0, set(cores.client))
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="proxy-overhead-") as tmp:
        stack = Stack(Path(tmp))
        try:
            for kind in args.upstreams:
                port, proxy_port, bare_port = free_port(), free_port(), free_port()
                upstream = f"http://127.0.0.1:{port}"
                if kind == "scripted":
                    pacing = ["--engine-steps"] if args.pacing == "steps" and args.gap_ms else []
                    stack.start([python, "-m", "benchmarks.scripted_upstream", "--port", str(port),
                                 "--delay-ms", str(args.gap_ms), *pacing],
                                f"{upstream}/health", cpus=set(cores.servers[0]) if cores else None)
                else:
                    stack.start([python, "-m", "deploy", "serve", "tiny-qwen3", "--port", str(port)],
                                f"{upstream}/health", env=cores.env(0) if cores else None,
                                cpus=set(cores.servers[0]) if cores else None)
                stack.start([python, "-m", "serving", "--backend", f"tiny-qwen3={upstream}",
                             "--port", str(proxy_port)], f"http://127.0.0.1:{proxy_port}/ready")
                proxy_pid = stack.processes[-1].pid
                stack.start([python, "-m", "benchmarks.bare_relay", "--upstream", upstream, "--port", str(bare_port)],
                            f"http://127.0.0.1:{bare_port}/health")
                urls = {"direct": upstream, "proxy": f"http://127.0.0.1:{proxy_port}",
                        "bare": f"http://127.0.0.1:{bare_port}"}
                pids = {"proxy": proxy_pid, "bare": stack.processes[-1].pid}
                for concurrency in args.concurrency:
                    cells = asyncio.run(measure(urls, pids, "tiny-qwen3", concurrency, args.seconds, args.rounds))
                    print(_row(kind, concurrency, cells), flush=True)
        finally:
            stack.stop()
    where = (f"upstream on CPU {cpu_list(cores.servers[0])}, relays and load generator on CPU "
             f"{cpu_list(cores.client)}" if cores else "every process on every CPU")
    scripted = (f"scripted upstream {args.gap_ms:g} ms between events ({args.pacing} pacing); "
                if "scripted" in args.upstreams else "")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs "
          f"({where}), Python {platform.python_version()}; "
          f"{TOKENS_PER_REQUEST} tokens per request, {args.seconds:.0f} s per cell and mode; {scripted}"
          "d/p/b = direct / proxy / bare relay")
    return 0


HEADER = (f"{'upstream':<9} {'streams':>7} {'TTFT p50 d/p/b (ms)':>22} {'added':>6} {'TTFT p99 d/p/b (ms)':>22} "
          f"{'tok/s direct':>12} {'proxy':>6} {'bare':>6} {'events/resp d/p/b':>17} {'errors':>6} "
          f"{'CPU us/event proxy':>18} {'bare':>6} {'p/b':>5}")


def _row(kind: str, concurrency: int, cells: dict[str, Cell]) -> str:
    direct, proxied, bare = cells["direct"], cells["proxy"], cells["bare"]

    def ratio(cell: Cell) -> float:
        return cell.tokens_per_second / direct.tokens_per_second if direct.tokens_per_second else float("nan")

    def events(cell: Cell) -> str:
        return f"{statistics.median(cell.events):.0f}" if cell.events else "0"

    p50 = "/".join(f"{c.ttft(0.5) * 1000:.1f}" for c in (direct, proxied, bare))
    p99 = "/".join(f"{c.ttft(0.99) * 1000:.1f}" for c in (direct, proxied, bare))
    added = (proxied.ttft(0.5) - direct.ttft(0.5)) * 1000
    cpu_ratio = proxied.cpu_us_per_event / bare.cpu_us_per_event if bare.cpu_us_per_event else float("nan")
    errors = sum(c.errors for c in cells.values())
    return (f"{kind:<9} {concurrency:>7} {p50:>22} {added:>+6.1f} {p99:>22} {direct.tokens_per_second:>12.0f} "
            f"{ratio(proxied):>6.2f} {ratio(bare):>6.2f} {'/'.join(events(c) for c in (direct, proxied, bare)):>17} "
            f"{errors:>6} {proxied.cpu_us_per_event:>18.1f} {bare.cpu_us_per_event:>6.1f} {cpu_ratio:>5.2f}")


if __name__ == "__main__":
    sys.exit(main())
