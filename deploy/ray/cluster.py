"""Start, join and leave a Ray cluster for vLLM's Ray executor (`ray start` / `ray stop`, argv lists).

GPUs are declared explicitly (`--num-gpus`): on a GPU node the visible NVIDIA count, or any count
for a logical cluster (tests, dry runs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import LaunchError
from deploy.host import GpuId

DEFAULT_PORT = 6379


def ray_cli() -> str:
    """The `ray` script installed beside this interpreter (the same Ray everywhere)."""
    return str(Path(sys.executable).with_name("ray"))


@dataclass(frozen=True)
class HeadOptions:
    port: int = DEFAULT_PORT
    num_gpus: int | None = None
    node_ip: str | None = None
    temp_dir: str | None = None
    dashboard: bool = False
    gpu_ids: tuple[GpuId, ...] | None = None  # only these GPUs (CUDA_VISIBLE_DEVICES of the raylet)


def reachable(address: str) -> bool:
    """Something listens at host:port (Ray's own clients retry for minutes when nothing does)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def cluster_alive(address: str) -> bool:
    """True when a Ray cluster answers at address (`ray status` exits 0)."""
    if not reachable(address):
        return False
    result = subprocess.run([ray_cli(), "status", "--address", address], capture_output=True, text=True,
                            timeout=60, check=False)
    return result.returncode == 0


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False,
                            env={**os.environ, **env} if env else None)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise LaunchError(f"{what} failed (exit {result.returncode}): {' '.join(detail)}")
    return result.stdout


def _node_args(num_gpus: int | None, node_ip: str | None, temp_dir: str | None) -> list[str]:
    args = ["--disable-usage-stats"]
    if num_gpus is not None:
        args += ["--num-gpus", str(num_gpus)]
    if node_ip:
        args += ["--node-ip-address", node_ip]
    if temp_dir:
        args += ["--temp-dir", temp_dir]
    return args


def start_head(options: HeadOptions) -> tuple[str, bool]:
    """Start a head node; returns (address, started). Idempotent: a running head is reused.

    The address names this node's IP as other nodes reach it (what `ray-worker HEAD=` needs).
    """
    import ray

    address = f"{options.node_ip or ray.util.get_node_ip_address()}:{options.port}"
    if cluster_alive(f"127.0.0.1:{options.port}") or cluster_alive(address):
        return address, False
    argv = [ray_cli(), "start", "--head", "--port", str(options.port),
            f"--include-dashboard={str(options.dashboard).lower()}",
            *_node_args(options.num_gpus, options.node_ip, options.temp_dir)]
    # Ray hands its workers GPUs from the raylet's CUDA_VISIBLE_DEVICES: the head's GPUs are these.
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, options.gpu_ids))} if options.gpu_ids is not None else None
    _run(argv, "ray start --head", env)
    return address, True


def start_worker(head: str, num_gpus: int | None = None, node_ip: str | None = None) -> None:
    if not cluster_alive(head):
        raise LaunchError(f"no Ray head answers at {head}: start it with `make ray-head` on the head node "
                          "and pass its address as HEAD=<ip>:<port>")
    _run([ray_cli(), "start", "--address", head, *_node_args(num_gpus, node_ip, None)], "ray start (worker)")


def stop() -> None:
    """Stop every Ray process of this node (what `ray stop` does)."""
    _run([ray_cli(), "stop", "--force"], "ray stop")
