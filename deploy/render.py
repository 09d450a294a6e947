"""What a profile renders to: its engine's server argv and environment, a pure, deterministic
function of the profile. The one entry point of `deploy render`, `serve`, the chart generator and
the golden tests; the flags themselves are the engine's (deploy/engines/)."""

from __future__ import annotations

from deploy.engines.base import Command
from deploy.engines.registry import engine_for
from deploy.profile import Profile


def engine_args(profile: Profile, model: str | None = None) -> list[str]:
    """The engine's server arguments (without the program), in a fixed order."""
    return engine_for(profile).args(profile, model)


def server_command(profile: Profile, port: int | None = None, python: str | None = None) -> Command:
    """The full argv the launcher execs (argv list, never a shell string) and its environment."""
    return engine_for(profile).command(profile, port=port, python=python)
