"""vLLM servers and proxies for the routing benchmarks (benchmarks/routing.py and its scale-out mode,
benchmarks/scale_out.py): each vLLM a `deploy serve` of one replica, each proxy a generated config."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks import loadgen
from benchmarks.client import Endpoint
from benchmarks.loadgen import Pattern
from benchmarks.processes import Cores, Stack, cpu_list, free_port
from benchmarks.runner import BenchError


def proxy_config(profile: str, port: int, backends: list[str], policy: str | None) -> dict[str, Any]:
    """The proxy's config for one setup (configs/proxy.yaml's format)."""
    model: dict[str, Any] = {"profile": profile, "backends": backends}
    if policy is not None:
        model["routing"] = policy
    return {"listen": {"host": "127.0.0.1", "port": port}, "models": [model]}


def start_vllm(stack: Stack, profile: str, name: str, index: int, cores: Cores | None,
               port: int | None = None, when: str = "") -> str:
    """vLLM server `name` (the `index`-th, on its own cores when they are kept apart) until healthy;
    its base URL. One replica: the comparison is of servers, not of a box's whole layout."""
    port = port or free_port()
    where = f", CPU {cpu_list(cores.servers[index])}" if cores else ""
    print(f"starting vLLM {name} ({profile}) on port {port}{where}{when}", flush=True)
    stack.start([sys.executable, "-m", "deploy", "serve", profile, "--port", str(port), "--replicas", "1"],
                f"http://127.0.0.1:{port}/health", timeout=600,
                env=cores.env(index) if cores else None, cpus=set(cores.servers[index]) if cores else None)
    return f"http://127.0.0.1:{port}"


def start_proxy(stack: Stack, path: Path, config: dict[str, Any]) -> str:
    """A proxy on `config` (written to `path`) until /ready; its base URL."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = config["listen"]["port"]
    stack.start([sys.executable, "-m", "serving", "--config", str(path)], f"http://127.0.0.1:{port}/ready")
    return f"http://127.0.0.1:{port}"


def warm_up(backends: list[str], served_name: str, count: int = 8) -> None:
    """A freshly started vLLM's first batches are slow: a few requests straight to each server, so
    that no setup's figures carry one server's start. Distinct prompts, sharing nothing with runs."""
    bodies = [{"model": served_name, "messages": [{"role": "user", "content": f"warm-up {i} " * 100}],
               "max_tokens": 32, "ignore_eos": True, "stream": True} for i in range(count)]
    for url in backends:
        records = asyncio.run(loadgen.run(Endpoint(url, served_name), bodies, Pattern(concurrency=4)))
        if not all(r.ok for r in records):
            failed = next(r for r in records if not r.ok)
            raise BenchError(f"warm-up request to {url} failed: {failed.error} {failed.error_detail or ''}")
