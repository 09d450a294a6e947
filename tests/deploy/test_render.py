"""Rendering is a pure, deterministic function of the profile, checked against golden files."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.loader import known_profiles, load_profile
from deploy.paths import REPO_ROOT
from deploy.render import engine_args, server_command

GOLDEN = Path(__file__).parent / "golden"


def portable(args: list[str]) -> list[str]:
    return [a.replace(str(REPO_ROOT), "<repo>") for a in args]


@pytest.mark.parametrize("name", known_profiles())
def test_golden_args(name: str) -> None:
    """A change to rendered flags must be deliberate: UPDATE_GOLDEN=1 rewrites the files."""
    rendered = portable(engine_args(load_profile(name)))
    path = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(rendered, indent=2) + "\n")
    assert rendered == json.loads(path.read_text())


def test_yarn_keeps_rope_theta_and_scales_max_positions() -> None:
    args = engine_args(load_profile("qwq-32b"))
    overrides = json.loads(args[args.index("--hf-overrides") + 1])
    assert overrides == {
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32768, "rope_theta": 1000000.0},
    }
    assert "--rope-scaling" not in args


def test_engine_args_escape_hatch() -> None:
    profile = load_profile("tiny-qwen3", ["engine_args={max-logprobs: 5, disable-log-stats: true, seed: null}"])
    args = engine_args(profile)
    assert args[-3:] == ["--max-logprobs", "5", "--disable-log-stats"]
    assert "--seed" not in args


def test_port_and_env() -> None:
    command = server_command(load_profile("tiny-qwen3"), port=9123)
    assert command.argv[command.argv.index("--port") + 1] == "9123"
    assert command.env == {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    assert command.shell_line().startswith("OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind ")
    assert shlex.split(command.shell_line())[len(command.env):] == command.argv


def test_cli_render_prints_json_and_shell_deterministically() -> None:
    def run() -> str:
        return subprocess.run(
            [sys.executable, "-m", "deploy", "render", "qwq-32b"], cwd=REPO_ROOT,
            capture_output=True, text=True, check=True,
        ).stdout

    out = run()
    assert out == run()
    json_line, shell_line = out.strip().splitlines()
    assert shlex.split(shell_line) == json.loads(json_line)
    machine = json.loads(subprocess.run(
        [sys.executable, "-m", "deploy", "render", "--all", "--json"], cwd=REPO_ROOT,
        capture_output=True, text=True, check=True,
    ).stdout)
    assert [item["profile"] for item in machine] == known_profiles()
    assert all(item["command"][3:] == item["argv"] for item in machine)
