"""Loading a profile: its file (by name or path), `--set` overrides, the typed parse, what its
engine refuses, and the adapters' own configs.

Above the typed profile (deploy/profile.py) and the engines (deploy/engines/), which therefore
never import each other. engine_args naming a flag the profile's keys render are refused here
for every engine, in every spelling argparse would accept, naming the key to set instead: the
flag would otherwise come twice and the engine take the last, so the running server would
disagree with what the proxy, plan and chart read from the profile.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from deploy.adapters import verify_adapters
from deploy.engines.base import Engine, flag_name
from deploy.engines.registry import ENGINES, engine_for
from deploy.errors import ProfileError
from deploy.paths import MODELS_DIR
from deploy.profile import Profile
from deploy.typed_config import describe_errors


def profile_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.yaml"


def known_profiles() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to raw profile data."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ProfileError(f"--set {item!r}: expected dotted.key=value, e.g. max_model_len=32768")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ProfileError(f"{source}: --set {key}: {part!r} is not a mapping")
            target = child
        target[parts[-1]] = value
    return data


def _rendered(engine: Engine, name: str) -> str | None:
    """Why engine_args may not name flag `name` on this engine (None: it may)."""
    if name in engine.fixed_flags:
        return f"{engine.label} always gets --{name} ({engine.fixed_flags[name]}): remove it"
    if name in engine.key_flags:
        owner = engine.key_flags[name]
        return f"--{name} is rendered from the profile's {owner}: set {owner} instead"
    for other in ENGINES.values():  # another engine's name for a key: the author meant the key
        if name in other.key_flags:
            owner = other.key_flags[name]
            return (f"--{name} is {other.label}'s flag for the profile's {owner}, which renders {engine.label}'s own: "
                    f"set {owner} instead")
    # Both engines' parsers expand an abbreviated long option (argparse's allow_abbrev).
    expanded = sorted(flag for flag in (*engine.key_flags, *engine.fixed_flags) if flag.startswith(name))
    if len(expanded) > 1:
        flags = " and ".join(f"--{flag}" for flag in expanded)
        return f"--{name} abbreviates {flags}, which the profile renders: remove it"
    if expanded:
        return f"--{name} abbreviates --{expanded[0]} (the parser expands it); {_rendered(engine, expanded[0])}"
    return None


def rendered_flags_in(engine: Engine, keys: Iterable[object]) -> dict[str, str]:
    """engine_args keys that name a flag the profile's keys render -> why: the engine's own (any
    spelling: `--flag`, `--flag=value`, `flag_name`, an abbreviation its parser would expand), or
    another engine's name for one (`max-num-seqs` on SGLang, `context-length` on vLLM)."""
    refused = {}
    for key in map(str, keys):
        name = flag_name(key)
        why = _rendered(engine, name) if name else None
        if why is not None:
            refused[key] = f"engine_args.{key}: {why}"
    return refused


def parse_profile(data: Any, source: str) -> Profile:
    """The typed profile from raw data, with everything its engine refuses at once; ProfileError
    naming source and keys otherwise."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    # On the raw keys, before the typed parse: its own rule on engine_args keys (a flag name, no
    # dashes, no value) would otherwise answer `--max-model-len` without naming the key to set.
    named = data.get("engine", Profile.model_fields["engine"].default)
    engine = ENGINES.get(named) if isinstance(named, str) else None
    raw_args = data.get("engine_args")
    refused: dict[str, str] = {}
    if engine is not None and isinstance(raw_args, dict):
        refused = rendered_flags_in(engine, raw_args)
        data = {**data, "engine_args": {k: v for k, v in raw_args.items() if str(k) not in refused}}
    reasons = list(refused.values())
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        errors = describe_errors(exc, "see configs/models/README.md for the keys")
        if engine is not None and reasons:
            errors = f"engine: {engine.name}: {'; '.join(reasons)}; {errors}"
        raise ProfileError(f"{source}: {errors}") from None
    reasons += engine_for(profile).refusals(profile)
    if reasons:
        raise ProfileError(f"{source}: engine: {profile.engine}: {'; '.join(reasons)}")
    return profile


def load_profile(name_or_path: str | Path, overrides: list[str] | None = None) -> Profile:
    """Load a profile by name (configs/models/<name>.yaml) or by file path, with --set overrides."""
    text_name = str(name_or_path)
    path = Path(text_name) if text_name.endswith((".yaml", ".yml")) else profile_path(text_name)
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {text_name!r}: no file {path}. Known profiles: {', '.join(known_profiles())}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    shown = path.resolve()
    if shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    source = str(shown) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides, source)
    profile = parse_profile(data, source)
    if profile.name != path.stem:
        raise ProfileError(f"{shown}: name: {profile.name!r} must equal the file name {path.stem!r}")
    verify_adapters(profile, source)
    return profile
