"""The multi-turn workload against the session's real vLLM (tiny model, CPU): real answers in the
history, conversations interleaved, per-backend counters in the results and the report."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import conversation_load, conversations
from benchmarks.client import Endpoint
from benchmarks.conversations import Shape
from benchmarks.workloads import TokenCounter
from deploy.paths import REPO_ROOT
from tests.conftest import RunningServer, Service

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def counter(tiny_model_dir: Path) -> TokenCounter:
    from transformers import AutoTokenizer

    return TokenCounter(AutoTokenizer.from_pretrained(tiny_model_dir), "chat")


def test_every_turn_carries_the_real_earlier_answers(vllm_server: RunningServer, counter: TokenCounter) -> None:
    shape = Shape(conversations=3, turns=3, system_tokens=16, first_turn_tokens=40, follow_up_tokens=10,
                  output_tokens=8)
    script = conversations.build(counter, shape, seed=11)
    records = asyncio.run(conversation_load.run(Endpoint(vllm_server.base_url, "tiny-qwen3"), script,
                                                concurrency=2))
    assert len(records) == 9 and all(r.ok for r in records), [r.error_detail for r in records if not r.ok]
    by_turn = {(r.conversation, r.turn): r for r in records}
    assert set(by_turn) == {(c, t) for c in range(3) for t in range(3)}
    # Interleaved: every conversation's first turn is sent before any second turn.
    sent = sorted(records, key=lambda r: r.index)
    assert [(r.conversation, r.turn) for r in sent[:3]] == [(0, 0), (1, 0), (2, 0)]
    for c in range(3):
        for t in range(3):
            record = by_turn[(c, t)]
            assert record.completion_tokens == 8
            if t:
                assert record.start > by_turn[(c, t - 1)].start + (by_turn[(c, t - 1)].end or 0)
            # What vLLM counted is the system prompt, the earlier turns and the answers it gave.
            answers = [by_turn[(c, earlier)].answer or "" for earlier in range(t)]
            text = counter.tokenizer.apply_chat_template(script.messages(c, t, answers),
                                                         add_generation_prompt=True, tokenize=False)
            assert record.prompt_tokens == len(counter.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_run_reports_each_backends_requests_and_prefix_cache(proxy_server: Service, vllm_server: RunningServer,
                                                              tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--base-url", proxy_server.base_url, "--model", "tiny",
         "--workload", "multi-turn", "--conversations", "4", "--turns", "3", "--concurrency", "3",
         "--first-turn-len", "64", "--follow-up-len", "16", "--system-len", "24", "--output-len", "8",
         "--metrics-url", f"a={vllm_server.metrics_url}", "--metrics-url", f"{proxy_server.base_url}/metrics",
         "--no-calibrate", "--no-plots", "--no-progress", "--results-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(next(tmp_path.glob("*.json")).read_text())
    [run] = result["runs"]
    assert run["completed"] == 12 and run["conversations_completed"] == 4
    assert [t["turn"] for t in run["turns"]] == [1, 2, 3] and all(t["completed"] == 4 for t in run["turns"])
    assert sorted((r["conversation"], r["turn"]) for r in run["requests"]) == [
        (c, t) for c in range(4) for t in range(3)]
    [backend] = run["backends"]["per_backend"].items()
    name, figures = backend
    assert name == "a"
    assert figures["requests"] == 12                      # warm-up requests excluded
    # Turns 2 and 3 re-send what vLLM cached for the turn before.
    assert 0 < figures["prefix_cache_hits"] < figures["prefix_cache_queries"]
    assert run["backends"]["prefix_cache_hit_rate"] == figures["prefix_cache_hit_rate"]
    for line in ("multi-turn (4 conversations x 3 turns; tokens: system 24, first turn 64, follow-up 16, answer 8)",
                 "server: requests per vLLM", "server: prefix-cache hit rate", "by turn at concurrency=3: 1: TTFT"):
        assert line in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--api", "completions"], "sends chat requests"),
    (["--rate", "4"], "closed loop of conversations"),
    (["--num-requests", "10"], "drop --num-requests"),
    (["--turns", "40"], "more than the model's context of 2048"),
])
def test_multi_turn_refusals_are_one_line(vllm_server: RunningServer, args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--base-url", vllm_server.base_url, "--model", "tiny-qwen3",
         "--workload", "multi-turn", "--no-calibrate", "--no-progress", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr and done.stderr.count("\n") == 1
