"""Capacity planning from config.json: KV bytes per token, weights, what fits."""

from __future__ import annotations

import subprocess
import sys

from deploy.loader import load_profile
from deploy.memory_plan import load_gpu_types, plan_memory, smallest_fit
from deploy.paths import REPO_ROOT

KIB = 1024
H100 = load_gpu_types()["h100-80gb"]


def test_kv_bytes_per_token() -> None:
    assert plan_memory(load_profile("qwq-32b"), H100, 2).kv_bytes_per_token == 256 * KIB
    assert plan_memory(load_profile("qwen3-4b-instruct-fp8"), H100, 1).kv_bytes_per_token == 144 * KIB
    fp8_kv = load_profile("qwen3-4b-instruct-fp8", ["kv_cache_dtype=fp8"])
    assert plan_memory(fp8_kv, H100, 1).kv_bytes_per_token == 72 * KIB


def test_kv_is_split_across_tensor_ranks() -> None:
    assert plan_memory(load_profile("qwq-32b"), H100, 2).kv_bytes_per_token_per_gpu == 128 * KIB


def test_weights_follow_dtype_and_quantization() -> None:
    qwq = plan_memory(load_profile("qwq-32b"), H100, 2)
    assert 32.0e9 < qwq.params < 33.5e9  # QwQ-32B: 32.5 B parameters
    assert abs(qwq.weight_bytes - 2 * qwq.params) < 1e6
    fp8 = plan_memory(load_profile("qwen3-4b-instruct-fp8"), H100, 1)
    assert 3.9e9 < fp8.params < 4.1e9
    assert 4.0e9 < fp8.weight_bytes < 5.0e9  # FP8 linears + bf16 embeddings, not 8 GB of bf16


def test_qwq_long_context_needs_two_gpus() -> None:
    profile = load_profile("qwq-32b")
    one = plan_memory(profile, H100, 1)
    assert not one.fits and one.kv_tokens < 131072
    smallest = smallest_fit(profile, H100)
    assert smallest is not None and smallest.gpus == 2 and smallest.fits


def test_the_smallest_fit_is_a_tensor_size_the_engines_accept() -> None:
    """On 24 GB GPUs QwQ's memory would fit on 5 (40 heads split evenly), but its 8 KV heads neither
    split over 5 nor are 5 whole copies: vLLM refuses tensor 5, so the plan names 8."""
    l4 = load_gpu_types()["l4"]
    profile = load_profile("qwq-32b")
    assert plan_memory(profile, l4, 5, tensor=5).fits  # memory alone would take 5
    smallest = smallest_fit(profile, l4)
    assert smallest is not None and smallest.tensor == 8


def test_cli_verdict_and_exit_status() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy", "plan", "qwq-32b", "--gpu", "h100-80gb", "--gpus", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    assert "DOES NOT FIT" in result.stdout and "smallest that fits is 2 x h100-80gb" in result.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "deploy", "plan", "qwq-32b", "--gpu", "h1000"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert unknown.returncode == 2 and "known: h100-80gb" in unknown.stderr
