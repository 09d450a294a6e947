"""What the proxy costs: the same load direct to an upstream and through the proxy, side by side.

    python -m benchmarks.proxy_overhead [--concurrency 1 16 64 256] [--seconds 6] [--rounds 2]

Starts a scripted SSE upstream (fast: the proxy's own cost dominates), the tiny model on vLLM's
CPU build (realistic pacing, sharing the cores), and the proxy in front of each; then for every
concurrency alternates direct and proxied rounds (the machine is noisy: interleaving keeps the
ratio fair), each client keeping its connections as real clients do, and prints added TTFT (p50,
p99) and proxied tokens/s as a fraction of direct (steady state: requests started in each
round's first 2 s are not counted), tokens counted from the servers' usage, plus events per
response (must match: no coalescing) and the proxy process's CPU time per relayed event.
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

from benchmarks.processes import Stack, free_port
from deploy.profile import load_profile

TOKENS_PER_REQUEST = 64
RAMP_SECONDS = 2.0


@dataclass
class Cell:
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    events: list[int] = field(default_factory=list)
    busy_seconds: float = 0.0
    errors: int = 0
    relayed_events: int = 0  # every event of the round, ramp included (the proxy's CPU covers all)
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


async def measure(direct: str, proxied: str, model: str, concurrency: int, seconds: float,
                  rounds: int, proxy_pid: int) -> tuple[Cell, Cell]:
    """Alternate direct and proxied rounds; each mode keeps one client (keep-alive) throughout."""
    totals = (Cell(), Cell())
    body = request_body(model)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as one, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as two:
        sessions = (one, two)
        for index in range(rounds):
            order = [(0, direct), (1, proxied)] if index % 2 == 0 else [(1, proxied), (0, direct)]
            for slot, url in order:
                before = cpu_seconds(proxy_pid)
                cell = await run_round(sessions[slot], url, body, concurrency, seconds / rounds, ramp=RAMP_SECONDS)
                if slot == 1:
                    cell.proxy_cpu_seconds = cpu_seconds(proxy_pid) - before
                totals[slot].merge(cell)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell and mode")
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/proxy rounds per cell")
    parser.add_argument("--upstreams", nargs="+", choices=["scripted", "vllm"], default=["scripted", "vllm"])
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.seconds <= 0 or args.rounds < 1:
        parser.error("concurrency >= 1, seconds > 0 and rounds >= 1")

    python = sys.executable
    rows = []
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="proxy-overhead-") as tmp:
        stack = Stack(Path(tmp))
        try:
            for kind in args.upstreams:
                port, proxy_port = free_port(), free_port()
                if kind == "scripted":
                    stack.start([python, "-m", "benchmarks.scripted_upstream", "--port", str(port)],
                                f"http://127.0.0.1:{port}/health")
                else:
                    stack.start([python, "-m", "deploy", "serve", "tiny-qwen3", "--port", str(port)],
                                f"http://127.0.0.1:{port}/health")
                stack.start([python, "-m", "serving", "--backend", f"tiny-qwen3=http://127.0.0.1:{port}",
                             "--port", str(proxy_port)], f"http://127.0.0.1:{proxy_port}/ready")
                proxy_pid = stack.processes[-1].pid
                for concurrency in args.concurrency:
                    direct, proxied = asyncio.run(measure(
                        f"http://127.0.0.1:{port}", f"http://127.0.0.1:{proxy_port}", "tiny-qwen3",
                        concurrency, args.seconds, args.rounds, proxy_pid))
                    rows.append((kind, concurrency, direct, proxied))
                    print(_row(*rows[-1]), flush=True)
        finally:
            stack.stop()
    print(f"\nmachine: {platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}; "
          f"{TOKENS_PER_REQUEST} tokens per request, {args.seconds:.0f} s per cell and mode")
    return 0


HEADER = (f"{'upstream':<9} {'streams':>7} {'TTFT p50 direct/proxy (ms)':>27} {'added':>7} "
          f"{'TTFT p99 d/p (ms)':>19} {'added':>7} {'tok/s direct':>12} {'tok/s proxy':>11} {'ratio':>6} "
          f"{'events/resp d/p':>15} {'errors':>6} {'proxy CPU us/event':>18}")


def _row(kind: str, concurrency: int, direct: Cell, proxied: Cell) -> str:
    p50d, p50p = direct.ttft(0.5) * 1000, proxied.ttft(0.5) * 1000
    p99d, p99p = direct.ttft(0.99) * 1000, proxied.ttft(0.99) * 1000
    ratio = proxied.tokens_per_second / direct.tokens_per_second if direct.tokens_per_second else float("nan")
    events_d = statistics.median(direct.events) if direct.events else 0
    events_p = statistics.median(proxied.events) if proxied.events else 0
    return (f"{kind:<9} {concurrency:>7} {p50d:>13.1f} / {p50p:<11.1f} {p50p - p50d:>+7.1f} "
            f"{p99d:>8.1f} / {p99p:<8.1f} {p99p - p99d:>+7.1f} {direct.tokens_per_second:>12.0f} "
            f"{proxied.tokens_per_second:>11.0f} {ratio:>6.2f} {events_d:>7.0f} / {events_p:<5.0f} "
            f"{direct.errors + proxied.errors:>6} {proxied.cpu_us_per_event:>18.1f}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
