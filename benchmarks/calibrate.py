"""How fast can this client go? Its ceiling against an instant upstream, measured on this machine.

A load generator near its own ceiling reports its own queueing as server latency. Each run
measures the ceiling first (~2 s against the scripted upstream, which answers at once) and warns
when the measured run used more than WARN_FRACTION of it.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.client import Endpoint
from benchmarks.processes import Stack, free_port
from benchmarks.stats import summarize

WARN_FRACTION = 0.5
CALIBRATION_TOKENS = 16
CALIBRATION_CONCURRENCY = 64


def measure(seconds: float = 2.0) -> dict[str, Any]:
    """The client's max request rate and chunk rate against the scripted upstream."""
    with tempfile.TemporaryDirectory(prefix="bench-calibrate-") as tmp:
        stack = Stack(Path(tmp))
        port = free_port()
        try:
            stack.start([sys.executable, "-m", "benchmarks.scripted_upstream", "--port", str(port)],
                        f"http://127.0.0.1:{port}/health", timeout=60)
            endpoint = Endpoint(base_url=f"http://127.0.0.1:{port}", model="scripted")
            body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": CALIBRATION_TOKENS}
            started = time.perf_counter()
            records = asyncio.run(loadgen.run(endpoint, [body] * 100_000,
                                              loadgen.Pattern(concurrency=CALIBRATION_CONCURRENCY),
                                              duration_s=seconds))
            elapsed = time.perf_counter() - started
        finally:
            stack.stop()
    summary = summarize(records)
    chunks = sum(len(r.token_times) for r in records)
    return {
        "max_request_rate": summary["completed"] / elapsed,
        "max_chunk_rate": chunks / elapsed,
        "concurrency": CALIBRATION_CONCURRENCY,
        "tokens_per_request": CALIBRATION_TOKENS,
        "failed": summary["failed"],
    }


def warnings_for(run: dict[str, Any], ceiling: dict[str, Any]) -> list[str]:
    """Warnings when a run came near the client's own ceiling."""
    out = []
    chunks = run.get("chunks_per_second", 0.0)
    if ceiling.get("max_request_rate") and run["request_throughput"] > WARN_FRACTION * ceiling["max_request_rate"]:
        out.append(f"{run['label']}: {run['request_throughput']:.1f} req/s is over "
                   f"{WARN_FRACTION:.0%} of this client's ceiling ({ceiling['max_request_rate']:.0f} req/s): "
                   "latency figures include client queueing; run the client on another machine")
    if ceiling.get("max_chunk_rate") and chunks > WARN_FRACTION * ceiling["max_chunk_rate"]:
        out.append(f"{run['label']}: {chunks:.0f} chunks/s is over {WARN_FRACTION:.0%} of this client's "
                   f"ceiling ({ceiling['max_chunk_rate']:.0f} chunks/s): ITL figures include client time")
    return out
