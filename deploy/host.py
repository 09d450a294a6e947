"""What this machine offers the launcher: the NVIDIA GPUs and CPU cores this process may use, and
free ports."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

# A GPU as CUDA_VISIBLE_DEVICES names it: its index (nvidia-smi's number) or a UUID (GPU-..., MIG-...).
GpuId = int | str


def gpu_id(text: str) -> GpuId:
    """'3' -> 3; a UUID stays a string."""
    text = text.strip()
    return int(text) if text.isdigit() else text


def visible_gpu_ids() -> list[GpuId]:
    """The NVIDIA GPUs this process may use, as CUDA_VISIBLE_DEVICES would name them.

    CUDA_VISIBLE_DEVICES narrows what nvidia-smi lists; like CUDA, its list ends at the first
    empty or -1 entry."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids: list[GpuId] = []
        for entry in visible.split(","):
            if not entry.strip() or entry.strip() == "-1":
                break
            ids.append(gpu_id(entry))
        return ids
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(m.group(1)) for line in out.stdout.splitlines() if (m := re.match(r"GPU (\d+):", line))]


def visible_gpus() -> int:
    """How many NVIDIA GPUs this process may use."""
    return len(visible_gpu_ids())


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity: a container's cpuset, taskset)."""
    return sorted(os.sched_getaffinity(0))


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on host:port (a server could bind it now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just had free on host (for helper servers started right after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
