"""What every serving engine provides, and the pieces the engines share.

An engine (deploy/engines/vllm.py, deploy/engines/sglang.py) renders a typed profile into its
server's argv and environment, refuses what it cannot serve, validates the argv with its own
code (`check`, one `Effective`), describes what it computed, and names its server module, its
memory budget and its metrics. The loader, plan, launcher, chart and CLI take the profile's
engine from deploy/engines/registry.py and never test its name: a third engine is one more
module here (and its name in the registry and the profile's `engine` choices).
"""

from __future__ import annotations

import json
import shlex
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from deploy.errors import CheckError
from deploy.profile import Profile

EngineArgs = Mapping[str, str | int | float | bool | None]


def flag(name: str) -> str:
    """A flag as profiles write it (`max-logprobs`) on the command line (`--max-logprobs`)."""
    return "--" + name.replace("_", "-")


def flag_name(key: str) -> str:
    """The flag an engine_args key names, however it is spelled: `--max-model-len=1000`,
    `max_model_len` and `--hf-overrides.rope_theta` (vLLM's dotted form) name `max-model-len`
    and `hf-overrides`."""
    return key.strip().lstrip("-").split("=", 1)[0].split(".", 1)[0].replace("_", "-")


def extra_args(engine_args: EngineArgs) -> list[str]:
    """A profile's engine_args on the command line: true -> the bare flag, false/null -> left out."""
    args: list[str] = []
    for name, value in engine_args.items():
        if value is True:
            args.append(flag(name))
        elif value is not False and value is not None:
            args += [flag(name), str(value)]
    return args


@dataclass(frozen=True)
class Command:
    """One server process: its argv (a list, never a shell string) and the environment it adds."""

    argv: list[str]
    env: dict[str, str]

    def shell_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


@dataclass(frozen=True)
class Effective:
    """A profile's serving configuration as its engine's own code computed it (`deploy check`).

    `values` are under the engine's own names (vLLM's max_model_len, SGLang's context_length),
    in the order `check --json` prints them between the profile's name and the engine's.
    """

    profile: str
    engine: str
    computed_by: str  # who computed the values, as check says it: "vLLM", "SGLang 0.5.23"
    values: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, **self.values, "engine": self.engine}


@dataclass(frozen=True)
class EngineMetrics:
    """The engine's Prometheus names that the benchmarks and the chart read from its /metrics."""

    counters: Mapping[str, str]  # counter -> what the benchmark report calls its delta over a run
    peak_gauges: Mapping[str, str]  # gauge -> the report key of its peak during a run
    requests_finished: str  # the counter that says a run's requests were all counted
    requests_waiting: str  # the queue the chart's default KEDA query scales on


def rope_row(values: Mapping[str, Any]) -> str:
    """The YaRN (or no) scaling an engine computed, as check prints it."""
    if values["rope_type"] == "default":
        return "none"
    original = values["rope_original_max_position_embeddings"]
    return f"{values['rope_type']} factor {values['rope_factor']} over {original}"


def config_dir(profile: Profile) -> Path:
    """The directory holding the model's config.json that check points the engine at."""
    found = profile.config_dir
    if found is None or not (found / "config.json").is_file():
        hint = "run `make tiny-model`" if profile.generator else "set offline_config to a directory under configs/"
        raise CheckError(f"{profile.name}: no config.json at {found}: {hint}")
    return found


def config_theta(config_dir: Path) -> float | None:
    """The model's own RoPE theta (config.json), which a YaRN override must keep."""
    config = json.loads((config_dir / "config.json").read_text())
    theta = config.get("rope_theta")
    if theta is None and isinstance(config.get("rope_parameters"), dict):
        theta = config["rope_parameters"].get("rope_theta")
    return float(theta) if theta is not None else None


class Engine(ABC):
    """One serving engine. Instances are stateless but for what tests inject (a probe's python)."""

    name: ClassVar[str]  # the profile's `engine:` value
    label: ClassVar[str]  # as users know it: vLLM, SGLang
    server_module: ClassVar[str]  # the server it runs: python -m <server_module> <args>
    metrics: ClassVar[EngineMetrics]
    # The engine's flags (as profiles write flags: no dashes) that profile keys render -> the key.
    # engine_args may not name them, in any spelling, for this engine or (where they are not
    # flags of its own) for another: the loader refuses them naming the key.
    key_flags: ClassVar[Mapping[str, str]]
    # Flags rendered whatever the profile says -> why.
    fixed_flags: ClassVar[Mapping[str, str]] = {}
    # The flag gpu_memory_utilization renders, and whether activations and CUDA graphs come out
    # of that budget (vLLM) or on top of it (SGLang's --mem-fraction-static: weights + KV only).
    budget_flag: ClassVar[str]
    budget_holds_activations: ClassVar[bool]
    # The engine's name in aiconfigurator (`backend_name`), whose data `plan --workload` forecasts with.
    aiconfigurator_backend: ClassVar[str]
    # Environment that keeps the engine's own INFO logs out of check's output. The CLI sets it,
    # not the check: servers a test session starts later must log as usual.
    check_log_env: ClassVar[Mapping[str, str]] = {}

    @abstractmethod
    def args(self, profile: Profile, model: str | None = None) -> list[str]:
        """The server's arguments (after `python -m <server_module>`), in a fixed order; `model`
        replaces the profile's model (check points it at a config.json-only directory)."""

    @abstractmethod
    def check(self, profile: Profile) -> Effective:
        """The rendered argv judged by the engine's own code; CheckError on any refusal."""

    @abstractmethod
    def effective_rows(self, effective: Effective) -> list[tuple[str, object]]:
        """What check prints under its OK line: (label, value), in the engine's order."""

    def refusals(self, profile: Profile) -> list[str]:
        """Every setting this engine has no equivalent for, each as 'key: what is wrong; what to
        do'. Empty for a profile it can serve as written. (engine_args naming a flag a profile
        key renders are the loader's, for every engine.)"""
        return []

    def serve_refusal(self, profile: Profile) -> str | None:
        """Why `deploy serve` cannot start this engine here, or None when it can."""
        return None

    @abstractmethod
    def version(self) -> str | None:
        """The engine version this kit runs (None when it cannot be told here)."""

    def lora_slots(self, max_loras: int) -> int:
        """Adapter slots the engine allocates on each GPU for lora.max_loras."""
        return max_loras

    def env(self, profile: Profile) -> dict[str, str]:
        """The environment the server process gets on top of the caller's."""
        return dict(sorted(profile.env.items()))

    def command(self, profile: Profile, port: int | None = None, python: str | None = None) -> Command:
        """The full argv the launcher execs (argv list, never a shell string) and its environment."""
        if port is not None:
            profile = profile.model_copy(update={"port": port})
        argv = [python or sys.executable, "-m", self.server_module, *self.args(profile)]
        return Command(argv=argv, env=self.env(profile))

    def describe(self, effective: Effective) -> str:
        """check's text: the OK line, then what the engine computed, one aligned row each."""
        rows = [f"  {name:<18} {value}" for name, value in self.effective_rows(effective)]
        return "\n".join([f"{effective.profile}: OK (as computed by {effective.computed_by})", *rows])
