"""`python -m deploy ray-head | ray-worker | ray-stop`, and the Ray part of `status`."""

from __future__ import annotations

import argparse
import logging
import os

from deploy.errors import LaunchError
from deploy.host import visible_gpus
from deploy.ray import cluster as ray_cluster


def cmd_head(args: argparse.Namespace) -> int:
    gpus = args.num_gpus if args.num_gpus is not None else visible_gpus()
    options = ray_cluster.HeadOptions(port=args.port, num_gpus=gpus, node_ip=args.node_ip,
                                      temp_dir=args.temp_dir, dashboard=args.dashboard)
    address, started = ray_cluster.start_head(options)
    state = "started" if started else "already running"
    print(f"Ray head {state} at {address} ({gpus} GPUs declared on this node)")
    print(f"join other nodes with: make ray-worker HEAD={address}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    gpus = args.num_gpus if args.num_gpus is not None else visible_gpus()
    ray_cluster.start_worker(args.head, num_gpus=gpus, node_ip=args.node_ip)
    print(f"joined the Ray cluster at {args.head} with {gpus} GPUs")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    ray_cluster.stop()
    print("Ray stopped on this node")
    return 0


def print_cluster(address: str | None) -> None:
    """The Ray cluster: nodes, GPUs free/used, what is serving. Without an address (nor
    RAY_ADDRESS) a missing cluster is one line; a named one that does not answer is an error."""
    import ray

    named = address or os.environ.get("RAY_ADDRESS")
    target = named or "auto"
    if named and named != "auto" and not ray_cluster.reachable(named):
        raise LaunchError(f"no Ray cluster answers at {named!r}: start one with make ray-head")
    try:
        ray.init(address=target, logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError):
        if named:
            raise LaunchError(f"no Ray cluster answers at {target!r}: start one with make ray-head") from None
        print("Ray: no cluster on this node")
        return
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        print(f"Ray cluster {ray.get_runtime_context().gcs_address}: {len(nodes)} node(s), "
              f"GPUs {free.get('GPU', 0):g} free of {total.get('GPU', 0):g}")
        for node in nodes:
            resources = node.get("Resources", {})
            role = "head" if resources.get("node:__internal_head__") else "worker"
            print(f"  {node['NodeManagerAddress']:<15} {role:<6} GPUs {resources.get('GPU', 0):g}  "
                  f"CPUs {resources.get('CPU', 0):g}")
        # vLLM's Ray executor reserves its GPUs in a placement group (one per replica): that is what is serving.
        groups = [g for g in ray.util.placement_group_table().values() if g.get("state") == "CREATED"]
        if not groups:
            print("  serving: nothing (no placement group holds GPUs)")
        for group in groups:
            gpus = sum(b.get("GPU", 0) for b in group.get("bundles", {}).values())
            print(f"  serving: placement group {group.get('name') or group['placement_group_id'][:12]} "
                  f"holding {gpus:g} GPUs ({group.get('strategy', '')})")
    finally:
        ray.shutdown()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("ray-head", help="start (or reuse) a Ray head on this node")
    p.add_argument("--port", type=int, default=ray_cluster.DEFAULT_PORT, help="GCS port (default 6379)")
    p.add_argument("--num-gpus", type=int, help="GPUs to declare (default: the visible NVIDIA GPUs)")
    p.add_argument("--node-ip", help="this node's IP as other nodes reach it")
    p.add_argument("--temp-dir", help="Ray's session directory (default /tmp/ray)")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    p.set_defaults(func=cmd_head)

    p = subparsers.add_parser("ray-worker", help="join this node to a Ray cluster")
    p.add_argument("--head", required=True, help="the head's address, ip:port")
    p.add_argument("--num-gpus", type=int, help="GPUs to declare (default: the visible NVIDIA GPUs)")
    p.add_argument("--node-ip", help="this node's IP as other nodes reach it")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("ray-stop", help="stop Ray on this node")
    p.set_defaults(func=cmd_stop)
