"""`deploy check` on SGLang profiles: the pinned SGLang's own parser, ModelConfig and rotary
embedding judge the rendered argv (deploy/engines/sglang_probe.py in .cache/sglang-venv, which
`make test` builds). Each shipped SGLang profile is probed once per session (~10-30 s each)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from deploy.engines.base import Effective
from deploy.engines.sglang import SGLANG
from deploy.engines.sglang_check import pinned_version
from deploy.errors import CheckError
from deploy.loader import known_profiles, load_profile
from deploy.paths import REPO_ROOT

SGLANG_PROFILES = [name for name in known_profiles() if load_profile(name).engine == "sglang"]


@pytest.fixture(scope="session")
def effective() -> Iterator[dict[str, Effective]]:
    """Every shipped SGLang profile as SGLang computes it, probed at once (one process each)."""
    with ThreadPoolExecutor(max_workers=len(SGLANG_PROFILES)) as pool:
        results = pool.map(lambda name: SGLANG.check(load_profile(name)), SGLANG_PROFILES)
        yield dict(zip(SGLANG_PROFILES, results, strict=True))


def test_the_sglang_profiles_are_shipped() -> None:
    assert SGLANG_PROFILES == ["qwen3-4b-instruct-fp8-sglang", "qwen3-4b-thinking-fp8-sglang", "qwq-32b-sglang"]


def test_qwq_yarn_as_sglang_computes_it(effective: dict[str, Effective]) -> None:
    e = effective["qwq-32b-sglang"]
    assert e["context_length"] == 131072
    assert (e["rope_type"], e["rope_factor"], e["rope_original_max_position_embeddings"]) == ("yarn", 4.0, 32768)
    assert e["rope_theta"] == 1_000_000.0
    # The embedding the attention layers build: YaRN over all 131,072 positions, not plain RoPE.
    assert (e["rotary_embedding"], e["rotary_positions"]) == ("YaRNScalingRotaryEmbedding", 131072)
    assert (e["tensor_parallel_size"], e["pipeline_parallel_size"]) == (2, 1)
    assert (e["reasoning_parser"], e["tool_call_parser"]) == ("deepseek-r1", "hermes")


@pytest.mark.parametrize("name", ["qwen3-4b-instruct-fp8-sglang", "qwen3-4b-thinking-fp8-sglang"])
def test_qwen3_fp8_as_sglang_computes_it(effective: dict[str, Effective], name: str) -> None:
    e = effective[name]
    assert (e["context_length"], e["quantization"], e["rope_theta"]) == (262144, "fp8", 5_000_000.0)
    assert (e["rotary_embedding"], e["rope_type"]) == ("RotaryEmbedding", "default")
    assert (e["mem_fraction_static"], e["chunked_prefill_size"]) == (0.85, 8192)
    assert e["max_running_requests"] == load_profile(name).max_num_seqs == {
        "qwen3-4b-instruct-fp8-sglang": 139, "qwen3-4b-thinking-fp8-sglang": 46}[name]
    assert e["radix_cache"] and e["cuda_graphs"] and e["enable_metrics"]
    assert e["access_log_excluded_prefixes"] == ["/health", "/metrics"]
    assert e["sglang_version"] == pinned_version()


def test_thinking_uses_sglangs_forced_qwen3_parser(effective: dict[str, Effective]) -> None:
    assert effective["qwen3-4b-thinking-fp8-sglang"]["reasoning_parser"] == "qwen3-thinking"
    assert effective["qwen3-4b-instruct-fp8-sglang"]["reasoning_parser"] is None


def test_context_beyond_the_model_fails_with_sglangs_reason() -> None:
    with pytest.raises(CheckError) as err:
        SGLANG.check(load_profile("qwen3-4b-instruct-fp8-sglang", ["max_model_len=300000"]))
    text = str(err.value)
    assert text.startswith("qwen3-4b-instruct-fp8-sglang: SGLang refused the model config (--context-length):")
    assert "User-specified context_length (300000) is greater than the derived context_length (262144)" in text


def test_a_flag_sglang_does_not_know_fails_with_its_parser() -> None:
    with pytest.raises(CheckError, match=r"SGLang refused the arguments \(--seed\): unrecognized arguments: --seed"):
        SGLANG.check(load_profile("qwen3-4b-instruct-fp8-sglang", ["engine_args={seed: 1}"]))


def test_check_all_validates_both_engines() -> None:
    result = subprocess.run([sys.executable, "-m", "deploy", "check", "--all", "--json"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    by_name = {item["profile"]: item for item in json.loads(result.stdout)}
    assert list(by_name) == known_profiles()
    assert by_name["qwq-32b-sglang"]["rotary_embedding"] == "YaRNScalingRotaryEmbedding"
    assert by_name["qwq-32b-sglang"]["context_length"] == 131072
    assert by_name["qwq-32b"]["max_model_len"] == 131072 and by_name["qwq-32b"]["rope_type"] == "yarn"
