"""Start a profile's engine servers: preflight checks, then supervise the replicas and the proxy.

The launcher lays the profile out on this machine (deploy/layout.py: replicas, each with its GPUs
or CPU cores and port, and the proxy in front), runs each server as a child (an argv list, never a
shell string), waits for their /health, prints how to reach them, restarts a replica that dies
while the rest keep serving, forwards SIGINT/SIGTERM and exits with the servers' status. What it
runs is written to .cache/run/ for `status`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deploy import run_state
from deploy.child import Child
from deploy.engines.registry import engine_for
from deploy.errors import LaunchError
from deploy.host import port_free, usable_cores, visible_gpu_ids
from deploy.layout import Ask, Layout, Machine, ids, plan_layout, ray_replicas
from deploy.profile import Profile
from deploy.ray import cluster as ray_cluster
from deploy.ray import preflight as ray_preflight
from deploy.supervise import ChildState, Supervisor


@dataclass
class Launch:
    """What `serve` will run, after every check that needs no process started."""

    profile: Profile
    layout: Layout
    warnings: list[str] = field(default_factory=list)
    started_ray: bool = False  # a single-node Ray head this launcher started (and must stop)


def ensure_model(profile: Profile) -> None:
    path = profile.model_path
    if path is not None and not (path / "config.json").is_file():
        if profile.generator != "tiny-qwen3":
            raise LaunchError(f"{profile.name}: model: no model at {path} (a local path: put the model there)")
        from deploy.tiny.model import generate

        print(f"generating the tiny model into {path} (no download, ~5 s)", file=sys.stderr)
        generate(path)
    ensure_adapters(profile)


def ensure_adapters(profile: Profile) -> None:
    """Local adapters must be there (the tiny one is generated, or made again when stale)."""
    for i, adapter in enumerate(profile.lora.adapters if profile.lora else []):
        path = adapter.path
        if adapter.generator == "tiny-lora" and path is not None and profile.model_path is not None:
            from deploy.tiny import lora as tiny_lora

            if not tiny_lora.is_current(path):
                print(f"generating the tiny LoRA adapter into {path} (peft, no download, ~10 s)", file=sys.stderr)
                tiny_lora.generate(path, base=profile.model_path)
        elif path is not None and not (path / "adapter_config.json").is_file():
            raise LaunchError(
                f"{profile.name}: lora.adapters[{i}].source: no adapter at {path} (no adapter_config.json): "
                "put the adapter there (peft's save_pretrained output) or name a hub id"
            )


def machine() -> Machine:
    return Machine(gpus=tuple(visible_gpu_ids()), cores=tuple(usable_cores()),
                   device_order=os.environ.get("CUDA_DEVICE_ORDER"))


def prepare(profile: Profile, ask: Ask | None = None, ray_address: str | None = None,
            dry_run: bool = False) -> Launch:
    """Every check that can fail before a server starts; returns what to run.

    A dry run generates nothing and starts no Ray head: without a cluster to ask, a Ray profile's
    preview holds the replicas asked for (one by default) and says the preflight did not run."""
    ask = ask or Ask()
    refused = engine_for(profile).serve_refusal(profile)
    if refused is not None:
        raise LaunchError(refused)
    if not dry_run:
        ensure_model(profile)
    here = machine()
    if profile.device != "cuda" or profile.parallelism.executor != "ray":
        layout = plan_layout(profile, ask, here, dry_run=dry_run)
        return Launch(profile, layout, list(layout.warnings))
    wanted = ray_replicas(profile, ask)
    report = ray_preflight.preflight(profile, ray_address, replicas=wanted, gpu_ids=ask.gpus, start=not dry_run)
    if report is None:
        count = wanted or 1
        layout = plan_layout(profile, ask, here, dry_run=True, ray_replica_count=count)
        note = (f"no Ray cluster answers here, so the Ray preflight did not run (a dry run starts none): this "
                f"preview holds {count} replica(s); start one with make ray-head to check the cluster")
        return Launch(profile, layout, [note, *layout.warnings])
    try:
        layout = plan_layout(profile, ask, here, dry_run=dry_run, ray_replica_count=report.replicas,
                             ray_env=report.env)
    except LaunchError:
        if report.started_cluster:
            ray_cluster.stop()
        raise
    return Launch(profile, layout, [*report.warnings, *layout.warnings], started_ray=report.started_cluster)


def release(launch: Launch) -> None:
    """Stop what prepare() started for this launch only."""
    if launch.started_ray:
        ray_cluster.stop()


def check_ports(layout: Layout) -> None:
    replicas = layout.replicas
    span = f"{replicas[0].port}-{replicas[-1].port}"
    for replica in replicas:
        if not port_free(replica.port):
            if len(replicas) == 1:
                raise LaunchError(f"port {replica.port} is in use: stop what listens there or pass PORT=<free port>")
            raise LaunchError(f"port {replica.port} (replica {replica.index}; the {len(replicas)} replicas use "
                              f"{span}) is in use: stop what listens there or pass PORT=<free port> (the first "
                              "replica's; the others take the next ones)")
    if layout.proxy_port is not None and not port_free(layout.proxy_port):
        raise LaunchError(f"port {layout.proxy_port} (the proxy's) is in use: stop what listens there or pass "
                          "PROXY_PORT=<free port> (--proxy-port)")


def children(layout: Layout) -> list[Child]:
    """A child per replica (restarted when it dies), then the proxy (whose death stops everything)."""
    engine = engine_for(layout.profile)
    several = len(layout.replicas) > 1
    found: list[Child] = [
        Child(name=f"{engine.name} replica {r.index} ({r.where}, port {r.port})" if several else engine.name,
              argv=r.command.argv, env={**os.environ, **r.command.env}, health_url=f"{r.url}/health",
              restartable=True, log_prefix=f"[replica {r.index}] " if several else None)
        for r in layout.replicas
    ]
    proxy = layout.proxy_argv()
    if proxy is not None:
        found.append(Child(name="proxy", argv=proxy, env=dict(os.environ),
                           health_url=f"http://127.0.0.1:{layout.proxy_port}/ready"))
    return found


def record(layout: Layout, states: list[ChildState], launcher_pid: int) -> run_state.ServeRecord:
    """The state file's content: the layout, and what the supervisor knows of each child now."""
    replicas = [
        run_state.ReplicaRecord(index=r.index, where=r.where, port=r.port,
                                gpus=list(r.gpus) if isinstance(r.gpus, tuple) else r.gpus,
                                pid=s.pid, state=s.status, restarts=s.restarts, last_exit=s.last_exit)
        for r, s in zip(layout.replicas, states, strict=False)
    ]
    proxy = None
    if layout.proxy_port is not None:
        state = states[len(layout.replicas)]
        proxy = run_state.ProxyRecord(port=layout.proxy_port, pid=state.pid, state=state.status)
    return run_state.ServeRecord(launcher_pid=launcher_pid, profile=layout.profile.name,
                                 served_model_name=layout.profile.served_model_name, replicas=replicas, proxy=proxy)


def serve(launch: Launch, startup_timeout: float, run_dir: Path = run_state.RUN_DIR) -> int:
    """Run the replicas (and the proxy in front of them) until stopped."""
    layout = launch.layout
    try:
        check_ports(layout)
    except LaunchError:
        release(launch)
        raise
    for warning in launch.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    launcher = os.getpid()
    run_state.remove_stale(run_dir)

    def written(states: list[ChildState]) -> None:
        run_state.write(record(layout, states, launcher), run_dir)

    supervisor = Supervisor(children(layout), startup_timeout=startup_timeout, on_change=written)
    try:
        return supervisor.run(on_ready=lambda: print(ready_message(layout), flush=True))
    finally:
        run_state.remove(launcher, run_dir)
        release(launch)


def ready_message(layout: Layout) -> str:
    profile = layout.profile
    replicas = layout.replicas
    port = layout.proxy_port or replicas[0].port
    url = f"http://127.0.0.1:{port}"
    body = (
        f'{{"model": "{profile.served_model_name}", '
        '"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 32}'
    )
    adapters = profile.adapter_names
    names = f"model name: {profile.served_model_name}" + (
        f"; LoRA adapters: {', '.join(adapters)} (send one as the model name)" if adapters else "")
    if len(replicas) == 1:
        behind = ""
    elif layout.proxy_port is not None:
        behind = (f"{len(replicas)} replicas behind the proxy (prefix affinity), on ports "
                  f"{replicas[0].port}-{replicas[-1].port}; `python -m deploy status` shows them\n")
    else:
        behind = (f"{len(replicas)} replicas, each on its own port ({ids(tuple(r.port for r in replicas))}), "
                  "no proxy in front (--no-proxy)\n")
    return (
        f"\n{profile.name} is ready at {url}/v1 ({names})\n{behind}"
        f"try:\n  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d '{body}'\n"
        "Ctrl-C stops it.\n"
    )
