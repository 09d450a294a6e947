"""The engines a profile's `engine:` can name, and the one way to get a profile's engine."""

from __future__ import annotations

from deploy.engines.base import Engine
from deploy.engines.sglang import SGLANG
from deploy.engines.vllm import VLLM
from deploy.profile import Profile

ENGINES: dict[str, Engine] = {engine.name: engine for engine in (VLLM, SGLANG)}


def engine_for(profile: Profile) -> Engine:
    """The engine that serves this profile (its `engine:` key)."""
    return ENGINES[profile.engine]
