"""Each engine's table of the flags profile keys render (what the loader refuses in engine_args),
held to the engine's own argument parser: the pinned vLLM's in this venv, the pinned SGLang's in
.cache/sglang-venv (which `make test` builds)."""

from __future__ import annotations

import json
import subprocess

import pytest

from deploy.engines.base import Engine, flag_name
from deploy.engines.registry import ENGINES
from deploy.engines.sglang import SGLANG
from deploy.engines.sglang_check import SGLANG_PYTHON
from deploy.engines.vllm import VLLM
from deploy.loader import known_profiles, load_profile
from deploy.render import engine_args

LORA = "lora={max_loras: 2, max_cpu_loras: 4, adapters: [{name: a, source: org/a}]}"
# Beside every shipped profile: one that sets every key the engine renders a flag for.
EVERY_KEY = {
    "vllm": ("qwq-32b", ["quantization=fp8", "kv_cache_dtype=fp8", "enforce_eager=true", "max_num_seqs=8", LORA]),
    "sglang": ("qwq-32b-sglang", ["quantization=fp8", "kv_cache_dtype=fp8", "enforce_eager=true",
                                  "enable_prefix_caching=false", "max_num_seqs=8", LORA]),
}
# SGLang's server parser, as prepare_server_args builds it, dumped as {dest: option strings}.
SGLANG_OPTIONS = """
import argparse, json
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
print(json.dumps({"allow_abbrev": parser.allow_abbrev,
                  "options": {a.dest: a.option_strings for a in parser._actions}}))
"""


def vllm_options() -> tuple[bool, dict[str, list[str]]]:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    return parser.allow_abbrev, {action.dest: list(action.option_strings) for action in parser._actions}


def sglang_options() -> tuple[bool, dict[str, list[str]]]:
    assert SGLANG_PYTHON.is_file(), "no .cache/sglang-venv: run `make sglang-venv`"
    out = subprocess.run([str(SGLANG_PYTHON), "-c", SGLANG_OPTIONS], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return data["allow_abbrev"], data["options"]


def rendered_dests(engine: Engine, options: dict[str, list[str]]) -> set[str]:
    """The parser dests the engine's argv sets, over every profile of that engine and EVERY_KEY."""
    dest_of = {option: dest for dest, strings in options.items() for option in strings}
    name, overrides = EVERY_KEY[engine.name]
    profiles = [load_profile(name, overrides)]
    profiles += [p for p in map(load_profile, known_profiles()) if p.engine == engine.name]
    flags = {arg.split("=", 1)[0] for p in profiles for arg in engine_args(p) if arg.startswith("--")}
    assert flags <= set(dest_of), f"flags {engine.label}'s parser does not know: {flags - set(dest_of)}"
    return {dest_of[flag] for flag in flags}


@pytest.fixture(scope="module", params=[pytest.param(VLLM, marks=pytest.mark.vllm), SGLANG], ids=lambda e: e.name)
def engine_options(request: pytest.FixtureRequest) -> tuple[Engine, bool, dict[str, list[str]]]:
    engine: Engine = request.param
    abbrev, options = vllm_options() if engine is VLLM else sglang_options()
    return engine, abbrev, options


def long_names(strings: list[str]) -> set[str]:
    return {s.removeprefix("--") for s in strings if s.startswith("--")}


def test_every_spelling_of_every_rendered_flag_is_in_the_table(
        engine_options: tuple[Engine, bool, dict[str, list[str]]]) -> None:
    engine, _, options = engine_options
    table = {*engine.key_flags, *engine.fixed_flags}
    missing = {dest: sorted(long_names(options[dest]) - table) for dest in rendered_dests(engine, options)}
    assert {dest: names for dest, names in missing.items() if names} == {}


def test_the_table_names_only_the_engines_own_flags(engine_options: tuple[Engine, bool, dict[str, list[str]]]) -> None:
    engine, _, options = engine_options
    known = set().union(*(long_names(strings) for strings in options.values()))
    assert {*engine.key_flags, *engine.fixed_flags} - known == set()


def test_no_flag_of_the_engine_is_refused_as_an_abbreviation(
        engine_options: tuple[Engine, bool, dict[str, list[str]]]) -> None:
    """The parser expands abbreviations (so the loader refuses a prefix of a rendered flag); an
    exact flag of the engine that is such a prefix would be refused wrongly."""
    engine, abbrev, options = engine_options
    assert abbrev
    table = {*engine.key_flags, *engine.fixed_flags}
    known = set().union(*(long_names(strings) for strings in options.values()))
    assert {name for name in known - table if any(f.startswith(name) for f in table)} == set()


def test_another_engines_names_refused_here_are_not_flags_of_this_engine(
        engine_options: tuple[Engine, bool, dict[str, list[str]]]) -> None:
    """The loader refuses another engine's name for a profile key; on this engine it must not be
    a flag the profile leaves to engine_args."""
    engine, _, options = engine_options
    known = set().union(*(long_names(strings) for strings in options.values()))
    borrowed = {flag for other in ENGINES.values() if other is not engine for flag in other.key_flags}
    assert (borrowed & known) - set(engine.key_flags) == set()


def test_spellings_come_down_to_the_flag() -> None:
    assert {flag_name(key) for key in ("max-model-len", "--max-model-len", "--max-model-len=1000", "max_model_len",
                                       "--max_model_len=7", " max-model-len ")} == {"max-model-len"}
    assert flag_name("--hf-overrides.rope_parameters.factor") == "hf-overrides"
