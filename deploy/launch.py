"""Start a profile's engine server: preflight checks, then supervise the server process.

The launcher runs the server (vLLM; an engine that cannot run here says why before anything
starts) as a child (an argv list, never a shell string), waits for its /health, prints how to
reach it, forwards SIGINT/SIGTERM and exits with the server's status.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from deploy.engines.base import Command
from deploy.engines.registry import engine_for
from deploy.errors import LaunchError
from deploy.host import port_free, visible_gpus
from deploy.profile import Profile
from deploy.ray import cluster as ray_cluster
from deploy.ray import preflight as ray_preflight
from deploy.render import server_command
from deploy.supervise import Child, Supervisor


@dataclass
class Launch:
    """What `serve` will run, after every check that needs no process started."""

    profile: Profile
    command: Command
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


def check_gpus(profile: Profile) -> None:
    if profile.device != "cuda" or profile.parallelism.executor == "ray":
        return  # the Ray preflight counts the cluster's GPUs, which may be on other nodes
    needed = profile.parallelism.world_size
    have = visible_gpus()
    if have < needed:
        hint = " On a machine without an NVIDIA GPU use MODEL=tiny-qwen3." if have == 0 else ""
        raise LaunchError(
            f"{profile.name} needs {needed} GPU(s) (tensor {profile.parallelism.tensor} x pipeline "
            f"{profile.parallelism.pipeline}); {have} visible.{hint}"
        )


def prepare(profile: Profile, port: int | None = None, ray_address: str | None = None,
            generate_model: bool = True) -> Launch:
    """Every check that can fail before a process starts; returns what to run."""
    refused = engine_for(profile).serve_refusal(profile)
    if refused is not None:
        raise LaunchError(refused)
    if generate_model:
        ensure_model(profile)
    check_gpus(profile)
    command = server_command(profile, port=port)
    warnings: list[str] = []
    if profile.parallelism.executor == "ray":
        report = ray_preflight.preflight(profile, ray_address)
        warnings += report.warnings
        command = Command(argv=command.argv, env={**command.env, **report.env})
        return Launch(profile, command, warnings, started_ray=report.started_cluster)
    return Launch(profile=profile, command=command, warnings=warnings)


def release(launch: Launch) -> None:
    """Stop what prepare() started for this launch only."""
    if launch.started_ray:
        ray_cluster.stop()


def serve(launch: Launch, port: int, proxy_port: int | None, startup_timeout: float) -> int:
    """Run the engine's server (and the proxy in front of it when proxy_port is given) until stopped."""
    profile = launch.profile
    for needed in (port, proxy_port):
        if needed is not None and not port_free(needed):
            release(launch)
            raise LaunchError(f"port {needed} is in use: stop what listens there or pass PORT=<free port>")
    for warning in launch.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    server = Child(
        name=engine_for(profile).name,
        argv=launch.command.argv,
        env={**os.environ, **launch.command.env},
        health_url=f"http://127.0.0.1:{port}/health",
    )
    children = [server]
    if proxy_port is not None:
        children.append(Child(
            name="proxy",
            argv=[sys.executable, "-m", "serving", "--backend", f"{profile.name}=http://127.0.0.1:{port}",
                  "--port", str(proxy_port)],
            env=dict(os.environ),
            health_url=f"http://127.0.0.1:{proxy_port}/ready",
        ))
    supervisor = Supervisor(children, startup_timeout=startup_timeout)
    public_port = proxy_port or port
    try:
        return supervisor.run(on_ready=lambda: print(ready_message(profile, public_port), flush=True))
    finally:
        release(launch)


def ready_message(profile: Profile, port: int) -> str:
    url = f"http://127.0.0.1:{port}"
    body = (
        f'{{"model": "{profile.served_model_name}", '
        '"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 32}'
    )
    adapters = profile.adapter_names
    names = f"model name: {profile.served_model_name}" + (
        f"; LoRA adapters: {', '.join(adapters)} (send one as the model name)" if adapters else "")
    return (
        f"\n{profile.name} is ready at {url}/v1 ({names})\n"
        f"try:\n  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"    -d '{body}'\n"
        "Ctrl-C stops it.\n"
    )
