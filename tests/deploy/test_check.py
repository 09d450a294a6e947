"""`deploy check`: the pinned vLLM's own parser and model-config code judge the rendered args."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.engines.vllm import VLLM
from deploy.errors import CheckError
from deploy.loader import load_profile
from deploy.paths import REPO_ROOT

pytestmark = pytest.mark.vllm


def test_qwq_yarn_as_vllm_computes_it() -> None:
    e = VLLM.check(load_profile("qwq-32b"))
    assert (e["rope_type"], e["rope_factor"], e["rope_original_max_position_embeddings"]) == ("yarn", 4.0, 32768)
    assert e["rope_theta"] == 1_000_000.0
    assert e["max_model_len"] == 131072
    assert (e["executor_backend"], e["tensor_parallel_size"], e["pipeline_parallel_size"]) == ("ray", 2, 1)
    assert e["reasoning_parser"] == "deepseek_r1" and e["tool_call_parser"] == "hermes"


def test_qwq_short_has_no_yarn() -> None:
    e = VLLM.check(load_profile("qwq-32b-short"))
    assert (e["rope_type"], e["max_model_len"], e["rope_theta"]) == ("default", 32768, 1_000_000.0)


@pytest.mark.parametrize("name", ["qwen3-4b-instruct-fp8", "qwen3-4b-thinking-fp8"])
def test_qwen3_fp8(name: str) -> None:
    e = VLLM.check(load_profile(name))
    assert (e["quantization"], e["max_model_len"], e["rope_theta"]) == ("fp8", 262144, 5_000_000.0)


def test_context_beyond_model_limit_fails_with_vllms_reason() -> None:
    with pytest.raises(CheckError) as err:
        VLLM.check(load_profile("qwen3-4b-instruct-fp8", ["max_model_len=300000"]))
    assert "qwen3-4b-instruct-fp8" in str(err.value)
    assert "max_model_len (300000) is greater than the derived max_model_len" in str(err.value)


def test_unknown_flag_fails_with_vllms_reason() -> None:
    with pytest.raises(CheckError, match=r"unrecognized arguments: --max-logprobz"):
        VLLM.check(load_profile("tiny-qwen3", ["engine_args={max-logprobz: 5}"]))


def test_wrong_rope_theta_is_caught() -> None:
    with pytest.raises(CheckError, match=r"rope_scaling.rope_theta: .*config.json has 1000000.0"):
        VLLM.check(load_profile("qwq-32b", ["rope_scaling.rope_theta=10000"]))


def test_unknown_reasoning_parser() -> None:
    with pytest.raises(CheckError, match=r"reasoning_parser: 'qwq' is not a reasoning parser.*deepseek_r1"):
        VLLM.check(load_profile("qwq-32b", ["reasoning_parser=qwq"]))


def test_cli_check_all(tiny_lora_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "check", "--all", "--json"], cwd=REPO_ROOT,
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    by_name = {item["profile"]: item for item in json.loads(result.stdout)}
    assert by_name["qwq-32b"]["rope_type"] == "yarn" and by_name["tiny-qwen3"]["max_model_len"] == 2048
    assert by_name["tiny-qwen3-lora"]["lora_adapters"][0]["name"] == "tiny-lora"


def test_cli_check_failure_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "check", "qwen3-4b-thinking-fp8", "--set", "max_model_len=300000"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "greater than the derived max_model_len" in errors[0]
    assert "Traceback" not in result.stderr


def test_health_and_metrics_polls_stay_out_of_the_access_log() -> None:
    """vLLM's own log config drops the polled paths (proxy health checks, probes, Prometheus)."""
    assert VLLM.check(load_profile("qwq-32b"))["access_log_excluded"] == ["/health", "/metrics"]
    assert VLLM.check(load_profile("tiny-qwen3", ["access_log_exclude=[]"]))["access_log_excluded"] == []
