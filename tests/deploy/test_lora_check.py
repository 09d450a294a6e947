"""LoRA through the pinned vLLM's own code: its parser reads the rendered flags, its LoRAConfig and
PEFTHelper judge them and the adapters; render/check/plan golden files for a Qwen3-4B profile
with two adapters (UPDATE_GOLDEN=1 rewrites them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from deploy.cli import main
from deploy.engines.vllm import VLLM
from deploy.errors import CheckError
from deploy.loader import load_profile
from deploy.paths import REPO_ROOT
from deploy.profile import MAX_LORA_RANKS
from deploy.render import engine_args

pytestmark = pytest.mark.vllm

PROFILE = Path(__file__).parent / "profiles" / "qwen3-4b-instruct-fp8-lora.yaml"
GOLDEN = Path(__file__).parent / "golden" / "lora"


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def test_max_ranks_are_vllms() -> None:
    from vllm.config.lora import MaxLoRARanks

    assert MAX_LORA_RANKS == get_args(MaxLoRARanks)


def test_golden_render() -> None:
    args = [a.replace(str(REPO_ROOT), "<repo>") for a in engine_args(load_profile(PROFILE))]
    golden("qwen3-4b-instruct-fp8-lora.render.json", json.dumps(args, indent=2) + "\n")


def test_golden_check(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # `check` quiets vLLM through the environment; undone after, for the servers tests start later.
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    assert main(["check", str(PROFILE)]) == 0
    golden("qwen3-4b-instruct-fp8-lora.check.txt", capsys.readouterr().out)


def test_golden_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(PROFILE), "--gpu", "h100-80gb"]) == 0
    golden("qwen3-4b-instruct-fp8-lora.plan.txt", capsys.readouterr().out)


def test_vllm_reads_the_adapters_from_the_rendered_flags() -> None:
    e = VLLM.check(load_profile(PROFILE))
    assert (e["lora_max_rank"], e["lora_max_loras"], e["lora_max_cpu_loras"], e["lora_dtype"]) == (16, 2, 4, "bfloat16")
    assert e["lora_adapters"] == [
        {"name": "qwen3-4b-support", "path": "tests/deploy/adapters/qwen3-4b-instruct-support",
         "base": "qwen3-4b-instruct", "rank": 16},
        {"name": "qwen3-4b-sql", "path": "example-org/qwen3-4b-instruct-sql-lora",
         "base": "qwen3-4b-instruct", "rank": None},  # a hub id: vLLM checks it when it downloads it
    ]
    assert VLLM.check(load_profile("qwen3-4b-instruct-fp8"))["lora_max_rank"] is None


def test_tiny_lora_profile(tiny_lora_dir: Path) -> None:
    e = VLLM.check(load_profile("tiny-qwen3-lora"))
    assert (e["lora_max_rank"], e["lora_adapters"][0]["rank"], e["lora_adapters"][0]["path"]) == (8, 8, ".cache/models/tiny-lora")


def test_lora_config_computed_by_vllm(tiny_lora_dir: Path) -> None:
    """LoRAConfig fills max_cpu_loras from max_loras, and lora_dtype from the model config."""
    e = VLLM.check(load_profile("tiny-qwen3-lora", ["lora.max_cpu_loras=null", "dtype=float16"]))
    assert (e["lora_max_cpu_loras"], e["lora_dtype"]) == (1, "float16")


def test_vllm_refuses_a_dora_adapter(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": True}))
    profile = load_profile("tiny-qwen3", [f"lora={{max_rank: 8, adapters: [{{name: d, source: '{tmp_path}'}}]}}"])
    with pytest.raises(CheckError, match=r"tiny-qwen3: lora.adapters\[0\].source \(d\): vLLM refused the adapter: "
                                         r"vLLM does not yet support DoRA."):
        VLLM.check(profile)


def test_vllms_parser_judges_other_lora_flags(tiny_lora_dir: Path) -> None:
    with pytest.raises(CheckError, match=r"argument --lora-dtype: invalid choice: 'float32'"):
        VLLM.check(load_profile("tiny-qwen3-lora", ["engine_args={lora-dtype: float32}"]))


def test_missing_local_adapter(tmp_path: Path) -> None:
    profile = load_profile("tiny-qwen3", [f"lora={{max_rank: 8, adapters: [{{name: d, source: '{tmp_path}/none'}}]}}"])
    with pytest.raises(CheckError, match=r"lora.adapters\[0\].source \(d\): no adapter_config.json at .*none: "
                                         r"put the adapter there"):
        VLLM.check(profile)


def test_cli_check_refusal_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 64, "base_model_name_or_path": "Qwen/QwQ-32B"}))
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "check", "qwq-32b", "--set",
         f"lora={{adapters: [{{name: wide, source: '{tmp_path}'}}]}}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "lora.adapters[0].source (wide)" in errors[0] and "set lora.max_rank to 64" in errors[0]
