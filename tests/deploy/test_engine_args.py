"""engine_args may not name a flag the profile's own keys render, for either engine, however the
flag is spelled: it would come twice in the argv, the engine's parser would take the last, and
the running server would disagree with what the proxy, plan and chart read from the profile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.errors import ProfileError
from deploy.loader import load_profile
from deploy.paths import MODELS_DIR, REPO_ROOT
from deploy.render import engine_args

VLLM_PROFILE = "qwen3-4b-instruct-fp8"
SGLANG_PROFILE = "qwen3-4b-instruct-fp8-sglang"

# (profile, engine_args key as written, the profile key the refusal names)
RENDERED = [
    (VLLM_PROFILE, "max-model-len", "max_model_len"),
    (VLLM_PROFILE, "--max-model-len", "max_model_len"),
    (VLLM_PROFILE, "--max-model-len=1000", "max_model_len"),
    (VLLM_PROFILE, "max_model_len", "max_model_len"),
    (VLLM_PROFILE, "--max_model_len", "max_model_len"),
    (VLLM_PROFILE, "port", "port"),
    (VLLM_PROFILE, "tensor-parallel-size", "parallelism.tensor"),
    (VLLM_PROFILE, "device-memory-utilization", "gpu_memory_utilization"),  # vLLM's alias
    (VLLM_PROFILE, "no-enable-prefix-caching", "enable_prefix_caching"),  # the --no- form
    (VLLM_PROFILE, "hf-overrides.max_position_embeddings", "rope_scaling"),  # vLLM's dotted JSON form
    (VLLM_PROFILE, "max-num-seqs", "max_num_seqs"),
    (VLLM_PROFILE, "max-model", "max_model_len"),  # argparse would expand the abbreviation
    (VLLM_PROFILE, "context-length", "max_model_len"),  # SGLang's name for the same key
    (VLLM_PROFILE, "mem-fraction-static", "gpu_memory_utilization"),
    (SGLANG_PROFILE, "context-length", "max_model_len"),
    (SGLANG_PROFILE, "--context-length=1000", "max_model_len"),
    (SGLANG_PROFILE, "context_length", "max_model_len"),
    (SGLANG_PROFILE, "tp-size", "parallelism.tensor"),
    (SGLANG_PROFILE, "tensor-parallel-size", "parallelism.tensor"),  # SGLang's own alias
    (SGLANG_PROFILE, "max-running-requests", "max_num_seqs"),
    (SGLANG_PROFILE, "max-model-len", "max_model_len"),  # vLLM's name for the same key
    (SGLANG_PROFILE, "context-len", "max_model_len"),  # an abbreviation
]


def profile_with(tmp_path: Path, name: str, engine_args: dict[str, Any]) -> Path:
    """A copy of a shipped profile whose engine_args mapping is written in the YAML file."""
    data = yaml.safe_load((MODELS_DIR / f"{name}.yaml").read_text())
    data["engine_args"] = engine_args
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("profile", "key", "owner"), RENDERED, ids=[f"{p}:{k}" for p, k, _ in RENDERED])
def test_a_rendered_flag_in_engine_args_is_refused_naming_the_key(tmp_path: Path, profile: str, key: str,
                                                                  owner: str) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(profile_with(tmp_path, profile, {key: 1000}))
    text = str(err.value)
    engine = load_profile(profile).engine
    assert text.startswith(f"{tmp_path / profile}.yaml: engine: {engine}: engine_args.{key}: "), text
    assert text.endswith(f"set {owner} instead"), text


@pytest.mark.parametrize("profile", [VLLM_PROFILE, SGLANG_PROFILE])
def test_through_set_too(profile: str) -> None:
    with pytest.raises(ProfileError, match=r"engine_args.max-model-len: .*set max_model_len instead"):
        load_profile(profile, ["engine_args.max-model-len=1000"])
    with pytest.raises(ProfileError, match=r"engine_args.--port: .*set port instead"):
        load_profile(profile, ["engine_args={--port: 9000}"])


def test_a_flag_rendered_whatever_the_profile_says_is_refused() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(SGLANG_PROFILE, ["engine_args={host: 127.0.0.1}"])
    assert ("engine_args.host: SGLang always gets --host (0.0.0.0, as SGLang listens on 127.0.0.1 by default): "
            "remove it") in str(err.value)


def test_every_rendered_flag_is_named_at_once_with_the_other_refusals() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile(SGLANG_PROFILE, ["engine_args={port: 1, max_num_seqs: 2}", "device=cpu"])
    text = str(err.value)
    assert "engine_args.port: " in text and "engine_args.max_num_seqs: " in text and "device: engine sglang" in text


def test_flags_the_profile_does_not_render_still_pass() -> None:
    vllm = engine_args(load_profile(VLLM_PROFILE, ["engine_args={max-logprobs: 5, host: 127.0.0.1, seed: 7}"]))
    assert vllm[-6:] == ["--max-logprobs", "5", "--host", "127.0.0.1", "--seed", "7"]
    sglang = engine_args(load_profile(SGLANG_PROFILE, ["engine_args={random-seed: 7, enable-cache-report: true}"]))
    assert sglang[-3:] == ["--random-seed", "7", "--enable-cache-report"]


def test_a_misspelled_flag_that_renders_nothing_keeps_the_profiles_own_rule() -> None:
    with pytest.raises(ProfileError, match=r"engine_args key 'max_logprobs' must be a flag name as the engine spells "
                                           r"it, without the leading dashes or a value, like 'max-logprobs'"):
        load_profile(VLLM_PROFILE, ["engine_args={max_logprobs: 5}"])


def test_cli_render_exits_2_naming_the_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "render", VLLM_PROFILE, "--set", "engine_args.max-model-len=1000"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert (result.returncode, result.stdout) == (2, "")
    [line] = result.stderr.strip().splitlines()
    assert line == (f"error: configs/models/{VLLM_PROFILE}.yaml (with --set engine_args.max-model-len=1000): "
                    "engine: vllm: engine_args.max-model-len: --max-model-len is rendered from the profile's "
                    "max_model_len: set max_model_len instead")
