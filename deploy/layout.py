"""How `serve` lays a profile out on this machine: replicas, each with its GPUs (or CPU cores) and
port, and the proxy in front. A pure function of the profile, what was asked and what the machine
offers; `serve --dry-run --json` prints it, the launcher runs it.

- vLLM's multiprocessing executor: each replica owns tensor x pipeline GPUs, given to it as
  CUDA_VISIBLE_DEVICES (with CUDA_DEVICE_ORDER=PCI_BUS_ID, so the ids are nvidia-smi's).
- The Ray executor: each replica is its own vLLM on the same Ray cluster, whose placement group
  takes tensor x pipeline GPUs wherever Ray finds them; the layout holds that count, not ids.
- The CPU: replicas split this process's cores between them (VLLM_CPU_OMP_THREADS_BIND), as
  replicas split a GPU box's GPUs. One replica keeps the profile's own threading.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from deploy.engines.base import Command
from deploy.errors import LaunchError
from deploy.host import GpuId
from deploy.profile import Profile
from deploy.render import server_command

# The proxy's port when several replicas need one endpoint and none was named (`make serve`'s).
DEFAULT_PROXY_PORT = 8000
MAX_PORT = 65535


@dataclass(frozen=True)
class Ask:
    """What the user asked `serve` for (None: decide from the profile and the machine)."""

    replicas: int | None = None
    gpus: tuple[GpuId, ...] | None = None
    port: int | None = None  # the first replica's; the profile's when None
    proxy_port: int | None = None
    no_proxy: bool = False


@dataclass(frozen=True)
class Machine:
    """What this machine offers: the visible GPUs' ids and the cores this process may use."""

    gpus: tuple[GpuId, ...] = ()
    cores: tuple[int, ...] = ()
    device_order: str | None = None  # the caller's CUDA_DEVICE_ORDER, kept; else nvidia-smi's (PCI_BUS_ID)


@dataclass(frozen=True)
class Replica:
    index: int
    gpus: tuple[GpuId, ...] | int  # the GPUs it owns, or how many Ray places for it
    cores: tuple[int, ...] | None  # CPU replicas: the cores its compute threads are bound to
    port: int
    command: Command  # argv, and the environment it adds to the launcher's

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def where(self) -> str:
        """Its share of the machine, as messages and `status` write it."""
        if isinstance(self.gpus, int):
            return f"{self.gpus} GPU(s) placed by Ray"
        if self.gpus:
            return f"GPU {ids(self.gpus)}" if len(self.gpus) == 1 else f"GPUs {ids(self.gpus)}"
        if self.cores is not None:
            return f"CPU core {ids(self.cores)}" if len(self.cores) == 1 else f"CPU cores {ids(self.cores)}"
        return "CPU"


@dataclass(frozen=True)
class Layout:
    profile: Profile
    replicas: tuple[Replica, ...]
    proxy_port: int | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def backends(self) -> list[str]:
        return [replica.url for replica in self.replicas]

    def proxy_argv(self, python: str | None = None) -> list[str] | None:
        """The proxy with every replica as a backend of the profile (its default routing: prefix affinity)."""
        if self.proxy_port is None:
            return None
        return [python or sys.executable, "-m", "serving", "--backend",
                f"{self.profile.name}={','.join(self.backends)}", "--port", str(self.proxy_port)]

    def as_json(self) -> dict[str, Any]:
        return {
            "replicas": [{"gpus": list(r.gpus) if isinstance(r.gpus, tuple) else r.gpus, "port": r.port,
                          "env": r.command.env, "argv": r.command.argv} for r in self.replicas],
            "proxy": None if self.proxy_port is None else {"port": self.proxy_port, "backends": self.backends},
        }

    def describe(self) -> str:
        """`serve --dry-run`: one block per replica (what it owns, then its command), then the proxy's."""
        blocks = []
        count = len(self.replicas)
        for replica in self.replicas:
            blocks.append(f"# replica {replica.index} of {count}: {replica.where}, port {replica.port}\n"
                          f"{replica.command.shell_line()}")
        proxy = self.proxy_argv()
        if proxy is None:
            blocks.append("# no proxy in front (--proxy-port PORT puts one there)")
        else:
            blocks.append(f"# proxy: port {self.proxy_port}, prefix affinity over {count} replica(s)\n"
                          f"{Command(argv=proxy, env={}).shell_line()}")
        return "\n\n".join(blocks)


def ids(values: tuple[GpuId, ...] | tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def parallel_text(profile: Profile, replicas: int = 1) -> str:
    par = profile.parallelism
    each = f"tensor {par.tensor} x pipeline {par.pipeline}"
    return each if replicas == 1 else f"{replicas} replicas x {each}"


def gpu_replicas(profile: Profile, ask: Ask, machine: Machine, dry_run: bool) -> list[tuple[GpuId, ...]]:
    """The GPUs of each replica, from --gpus (or the visible ones) and --replicas."""
    name, size = profile.name, profile.parallelism.world_size
    if ask.gpus is not None:
        chosen = ask.gpus
        repeated = sorted({str(g) for g in chosen if chosen.count(g) > 1})
        if repeated:
            raise LaunchError(f"--gpus {ids(chosen)}: GPU {', '.join(repeated)} named twice: name each GPU once")
        hidden = [g for g in chosen if g not in machine.gpus]
        if hidden and not dry_run:
            raise LaunchError(f"--gpus {ids(chosen)}: GPU {ids(tuple(hidden))} is not visible here (visible: "
                              f"{ids(machine.gpus) or 'none'}); name visible GPUs, as nvidia-smi numbers them")
        source = f"--gpus {ids(chosen)} gives {len(chosen)}"
    else:
        chosen = machine.gpus
        source = f"{len(chosen)} visible"
    if len(chosen) < size:
        hint = (" On a machine without an NVIDIA GPU use MODEL=tiny-qwen3, or preview the layout with "
                "--dry-run --gpus 0,1,..." if not chosen else "")
        raise LaunchError(f"{name} needs {size} GPU(s) ({parallel_text(profile)}); {source}.{hint}")
    fit = len(chosen) // size
    count = ask.replicas or fit
    if count > fit:
        raise LaunchError(
            f"{name}: --replicas {count} needs {count * size} GPUs ({parallel_text(profile, count)}); "
            f"{source}, which hold {fit}: pass --replicas {fit} or name more GPUs")
    return [tuple(chosen[i * size:(i + 1) * size]) for i in range(count)]


def ray_replicas(profile: Profile, ask: Ask) -> int | None:
    """Replicas asked of a Ray profile (--replicas, or what --gpus holds); None: what the cluster holds."""
    size = profile.parallelism.world_size
    if ask.gpus is None:
        return ask.replicas
    if len(ask.gpus) < size:
        raise LaunchError(f"{profile.name} needs {size} GPU(s) ({parallel_text(profile)}); "
                          f"--gpus {ids(ask.gpus)} gives {len(ask.gpus)}")
    fit = len(ask.gpus) // size
    if ask.replicas is not None and ask.replicas > fit:
        raise LaunchError(
            f"{profile.name}: --replicas {ask.replicas} needs {ask.replicas * size} GPUs "
            f"({parallel_text(profile, ask.replicas)}); --gpus {ids(ask.gpus)} gives {len(ask.gpus)}, which hold "
            f"{fit}: pass --replicas {fit} or name more GPUs")
    return ask.replicas or fit


def core_replicas(profile: Profile, ask: Ask, machine: Machine) -> list[tuple[int, ...] | None]:
    """Each CPU replica's cores (None: one replica, with the profile's own threading)."""
    if ask.gpus is not None:
        raise LaunchError(f"--gpus: {profile.name} runs on the CPU (device: cpu) and has no GPU to choose; "
                          "--replicas N splits this machine's cores between N servers")
    count = ask.replicas or 1
    if count == 1:
        return [None]
    size = profile.parallelism.world_size
    cores = machine.cores
    if len(cores) < count * size:
        raise LaunchError(
            f"{profile.name}: {count} replicas need {count * size} CPU core(s) (one per replica"
            f"{' and rank' if size > 1 else ''}); this process may use {len(cores)} (cores {ids(cores)}): "
            f"pass --replicas {max(1, len(cores) // size)}")
    return [tuple(part) for part in split(list(cores), count)]


def split(items: list[int], parts: int) -> list[list[int]]:
    """items in `parts` runs of consecutive items, the first ones one longer when they do not divide."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        runs.append(items[start:end])
        start = end
    return runs


def cpu_env(profile: Profile, cores: tuple[int, ...]) -> dict[str, str]:
    """vLLM's binding of a CPU replica's compute threads to its own cores ('|' between its ranks)."""
    ranks = split(list(cores), profile.parallelism.world_size)
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, rank)) for rank in ranks),
            "OMP_NUM_THREADS": str(len(ranks[0]))}


def proxy_port_for(ask: Ask, replicas: int) -> int | None:
    """--proxy-port; else the default when several replicas need one endpoint; never with --no-proxy."""
    if ask.no_proxy:
        return None
    if ask.proxy_port is not None:
        return ask.proxy_port
    return DEFAULT_PROXY_PORT if replicas > 1 else None


def plan_layout(profile: Profile, ask: Ask, machine: Machine, *, dry_run: bool = False,
                ray_replica_count: int = 1, ray_env: dict[str, str] | None = None) -> Layout:
    """The replicas and proxy `serve` runs. LaunchError when the ask does not fit the machine.

    A Ray profile's replica count comes from its preflight (`ray_replica_count`), which knows the
    cluster; `ray_env` is what the preflight sets for the node vLLM starts on."""
    warnings: list[str] = []
    shares: list[tuple[tuple[GpuId, ...] | int, tuple[int, ...] | None]]
    if profile.device == "cpu":
        shares = [((), cores) for cores in core_replicas(profile, ask, machine)]
    elif profile.parallelism.executor == "ray":
        shares = [(profile.parallelism.world_size, None)] * ray_replica_count
    else:
        groups = gpu_replicas(profile, ask, machine, dry_run)
        shares = [(group, None) for group in groups]
        pool = ask.gpus if ask.gpus is not None else machine.gpus
        idle = pool[len(groups) * profile.parallelism.world_size:]
        if idle and ask.replicas is None:
            warnings.append(f"GPU(s) {ids(idle)} left idle: {profile.name} takes {profile.parallelism.world_size} "
                            f"per replica ({parallel_text(profile)})")
    base = ask.port or profile.port
    last = base + len(shares) - 1
    if last > MAX_PORT:
        raise LaunchError(f"--port {base}: {len(shares)} replicas need ports {base}-{last}, beyond {MAX_PORT}: "
                          "pass a lower port")
    proxy_port = proxy_port_for(ask, len(shares))
    if proxy_port is not None and base <= proxy_port <= last:
        raise LaunchError(f"--proxy-port {proxy_port} is replica {proxy_port - base}'s port (replicas use "
                          f"{base}-{last}): pass another --proxy-port or --port")
    replicas = []
    for index, (gpus, cores) in enumerate(shares):
        command = server_command(profile, port=base + index)
        env = dict(command.env)
        if isinstance(gpus, tuple) and gpus:
            env.update(CUDA_DEVICE_ORDER=machine.device_order or "PCI_BUS_ID", CUDA_VISIBLE_DEVICES=ids(gpus))
        if cores is not None:
            env.update(cpu_env(profile, cores))
        env.update(ray_env or {})
        replicas.append(Replica(index, gpus, cores, base + index, Command(argv=command.argv, env=env)))
    return Layout(profile, tuple(replicas), proxy_port, tuple(warnings))
