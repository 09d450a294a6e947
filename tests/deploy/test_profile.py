"""Profiles parse into typed objects; bad ones are refused with file, key and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.errors import ProfileError
from deploy.loader import known_profiles, load_profile
from deploy.paths import MODELS_DIR, REPO_ROOT

SHIPPED = ["qwen3-4b-instruct-fp8", "qwen3-4b-instruct-fp8-sglang", "qwen3-4b-thinking-fp8",
           "qwen3-4b-thinking-fp8-sglang", "qwq-32b", "qwq-32b-sglang", "qwq-32b-short", "tiny-qwen3",
           "tiny-qwen3-lora"]


def write_profile(tmp_path: Path, name: str, changes: dict[str, Any]) -> Path:
    data = yaml.safe_load((MODELS_DIR / "qwq-32b.yaml").read_text())
    data["name"] = name
    data.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_profiles_load() -> None:
    assert known_profiles() == SHIPPED
    for name in SHIPPED:
        assert load_profile(name).name == name


def test_qwen_sampling_guidance_is_in_the_profiles() -> None:
    qwq = load_profile("qwq-32b").sampling
    assert (qwq.defaults.temperature, qwq.defaults.top_p) == (0.6, 0.95)
    assert qwq.defaults.top_k is not None and 20 <= qwq.defaults.top_k <= 40
    instruct = load_profile("qwen3-4b-instruct-fp8").sampling.defaults
    assert (instruct.temperature, instruct.top_p, instruct.top_k, instruct.min_p) == (0.7, 0.8, 20, 0.0)
    thinking = load_profile("qwen3-4b-thinking-fp8").sampling.defaults
    assert (thinking.temperature, thinking.top_p, thinking.top_k, thinking.min_p) == (0.6, 0.95, 20, 0.0)


def test_yarn_profile_and_short_variant() -> None:
    long, short = load_profile("qwq-32b"), load_profile("qwq-32b-short")
    assert long.rope_scaling is not None and long.rope_scaling.scaled_length == 131072
    assert long.parallelism.executor == "ray" and long.parallelism.tensor == 2
    assert short.rope_scaling is None and short.max_model_len == 32768


def test_typo_key_is_refused_with_file_and_key(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "typo", {"parallelism": {"tensr": 2}})
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert "typo.yaml" in str(err.value)
    assert "parallelism.tensr: unknown key" in str(err.value)


def test_string_where_number_belongs(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "strnum", {"max_num_seqs": "many"})
    with pytest.raises(ProfileError, match=r"strnum.yaml: max_num_seqs: .*integer.*'many'"):
        load_profile(path)


def test_range_is_checked(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "util", {"gpu_memory_utilization": 1.5})
    with pytest.raises(ProfileError, match=r"gpu_memory_utilization: .*less than or equal to 1"):
        load_profile(path)


def test_context_beyond_yarn_length(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "toolong", {"max_model_len": 200000})
    with pytest.raises(ProfileError, match=r"max_model_len 200000 exceeds .*4.0 x 32768 = 131072"):
        load_profile(path)


def test_name_must_match_file(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "right", {})
    other = path.with_name("wrong.yaml")
    path.rename(other)
    with pytest.raises(ProfileError, match="name: 'right' must equal the file name 'wrong'"):
        load_profile(other)


def test_mp_executor_cannot_span_nodes(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "span", {"parallelism": {"tensor": 4, "executor": "mp", "gpus_per_node": 2}})
    with pytest.raises(ProfileError, match="use executor: ray to span nodes"):
        load_profile(path)


def test_set_overrides_are_validated() -> None:
    assert load_profile("qwq-32b", ["max_model_len=65536"]).max_model_len == 65536
    with pytest.raises(ProfileError, match=r"--set parallelism.tensor=zero.*parallelism.tensor"):
        load_profile("qwq-32b", ["parallelism.tensor=zero"])
    with pytest.raises(ProfileError, match="expected dotted.key=value"):
        load_profile("qwq-32b", ["max_model_len"])


def test_alias_presets() -> None:
    profile = load_profile("qwq-32b", ["aliases=[{name: qwq-creative, sampling: {defaults: {temperature: 0.9}}}]"])
    assert profile.sampling_for("qwq-creative").defaults.temperature == 0.9
    assert profile.sampling_for("qwq-32b").defaults.temperature == 0.6


def test_unknown_profile_lists_known() -> None:
    with pytest.raises(ProfileError, match="Known profiles: .*qwq-32b.*tiny-qwen3"):
        load_profile("qwq-23b")


def test_cli_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "typo", {"max_model_lenn": 1})
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "render", str(path)], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "typo.yaml" in lines[0] and "max_model_lenn: unknown key" in lines[0]


def test_default_max_tokens_beyond_the_context_is_refused_at_load() -> None:
    """vLLM answers 400 to every request whose max_tokens exceeds max_model_len: a default that
    does is refused before anything runs, naming both keys and the fix."""
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "render", "qwq-32b-short", "--set", "max_model_len=8192"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "sampling.defaults.max_tokens 16384 exceeds max_model_len 8192" in line
    assert "lower sampling.defaults.max_tokens to at most 8192" in line and "raise max_model_len" in line


def test_an_alias_presets_max_tokens_is_checked_too() -> None:
    preset = "aliases=[{name: qwq-long, sampling: {defaults: {max_tokens: 40000}}}]"
    with pytest.raises(ProfileError, match=r"aliases\[0\].sampling.defaults.max_tokens \(qwq-long\) 40000 "
                                           r"exceeds max_model_len 32768"):
        load_profile("qwq-32b-short", [preset])


def test_a_default_max_tokens_equal_to_the_context_is_accepted() -> None:
    # vLLM clamps max_tokens <= max_model_len to what the prompt leaves (docs: environment.md).
    profile = load_profile("qwq-32b-short", ["max_model_len=16384"])
    assert profile.sampling.defaults.max_tokens == profile.max_model_len == 16384


@pytest.mark.parametrize("override, reason", [
    # pydantic's union branch tags ('Alias', 'str') are not in the key path the user reads.
    ("aliases=[{name: Bad}]", "aliases[0].name: String should match pattern"),
    ("env={VLLM_CPU_KVCACHE_SPACE: [1]}", "env.VLLM_CPU_KVCACHE_SPACE: Input should be a valid string"),
    ("sampling.defaults.top_k=x",
     "sampling.defaults.top_k: Input should be a valid integer, unable to parse string as an integer (got 'x')"),
])
def test_errors_name_the_key_path_as_written(override: str, reason: str) -> None:
    with pytest.raises(ProfileError) as err:
        load_profile("qwq-32b", [override])
    assert reason in str(err.value)
