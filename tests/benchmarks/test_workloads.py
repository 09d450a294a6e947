"""Workload generators: exact token counts with the tiny model's own tokenizer, reproducibility."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import pytest

from benchmarks import workloads
from benchmarks.workloads import Lengths, RequestSpec, TokenCounter, WorkloadError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def chat_tokens(tokenizer: Any, spec: RequestSpec) -> int:
    """Count as vLLM does for a chat request: template applied, then tokenized."""
    text = tokenizer.apply_chat_template(spec.messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("length", [13, 33, 256, 1500])
def test_synthetic_chat_prompts_have_exact_token_counts(tokenizer: Any, length: int) -> None:
    counter = TokenCounter(tokenizer, "chat")
    specs = list(workloads.synthetic(counter, 5, random.Random(1), Lengths(length), Lengths(16)))
    assert [chat_tokens(tokenizer, s) for s in specs] == [length] * 5
    assert all(s.max_tokens == 16 and s.ignore_eos for s in specs)
    assert len({s.messages[0]["content"] for s in specs if s.messages}) == 5  # distinct prompts


def test_completions_prompts_have_exact_token_counts(tokenizer: Any) -> None:
    counter = TokenCounter(tokenizer, "completions")
    specs = list(workloads.synthetic(counter, 5, random.Random(2), Lengths(100), None))
    assert [len(tokenizer(s.prompt)["input_ids"]) for s in specs] == [100] * 5
    assert all(s.max_tokens is None and not s.ignore_eos for s in specs)


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_length_distributions(tokenizer: Any, dist: Literal["uniform", "normal"]) -> None:
    counter = TokenCounter(tokenizer, "chat")
    specs = list(workloads.synthetic(counter, 40, random.Random(3), Lengths(200, dist, 0.25), Lengths(50, dist, 0.2)))
    inputs = [chat_tokens(tokenizer, s) for s in specs]
    assert inputs == [s.input_tokens for s in specs]
    assert len(set(inputs)) > 10
    if dist == "uniform":
        assert all(150 <= n <= 250 for n in inputs)
        assert all(40 <= (s.max_tokens or 0) <= 60 for s in specs)
    assert 170 < sum(inputs) / len(inputs) < 230


def test_same_seed_same_workload_other_seed_other_workload(tokenizer: Any) -> None:
    counter = TokenCounter(tokenizer, "chat")
    def make(seed: int) -> list[RequestSpec]:
        return list(workloads.synthetic(counter, 3, random.Random(seed), Lengths(64, "uniform", 0.5), Lengths(8)))
    assert make(7) == make(7)
    assert make(7) != make(8)


def test_shared_prefix_requests_share_the_prefix_exactly(tokenizer: Any) -> None:
    counter = TokenCounter(tokenizer, "chat")
    specs = list(workloads.shared_prefix(counter, 4, random.Random(4), 300, Lengths(40), Lengths(8)))
    contents = [s.messages[0]["content"] for s in specs if s.messages]
    prefix = contents[0]
    for other in contents[1:]:
        while not other.startswith(prefix):
            prefix = prefix[:-1]
    common = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert 295 <= common <= 301       # the shared words (a word boundary may split at the end)
    assert [chat_tokens(tokenizer, s) for s in specs] == [340] * 4


def test_reasoning_prompts_use_the_vendor_math_format() -> None:
    specs = list(workloads.reasoning(random.Random(5), 6, None))
    for spec in specs:
        assert spec.messages and spec.messages[0]["content"].endswith(workloads.MATH_INSTRUCTION)
        assert spec.max_tokens is None and not spec.ignore_eos   # natural length: it must think


def test_jsonl_reads_sharegpt_openai_and_prompt_lines(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        {"conversations": [{"from": "human", "value": "What is vLLM?"},
                           {"from": "gpt", "value": "a serving engine for large language models"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"prompt": "Tell me a joke"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    specs = workloads.jsonl(path, 3, random.Random(0), None, TokenCounter(tokenizer, "chat"))
    by_first = {s.messages[-1]["content"]: s for s in specs if s.messages}
    assert set(by_first) == {"What is vLLM?", "hi", "Tell me a joke"}
    sharegpt = by_first["What is vLLM?"]
    # The ShareGPT reply's token count becomes max_tokens, as vLLM's ShareGPT benchmark does.
    reply_tokens = len(tokenizer(" a serving engine for large language models"[1:], add_special_tokens=False)["input_ids"])
    assert sharegpt.max_tokens == reply_tokens and not sharegpt.ignore_eos
    assert by_first["hi"].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"conversations": [{"from": "robot", "value": "x"}]}\n')
    with pytest.raises(WorkloadError, match=r"bad.jsonl:2: not a prompt"):
        workloads.jsonl(path, 2, random.Random(0), None, None)
    with pytest.raises(WorkloadError, match="cannot read --dataset"):
        workloads.jsonl(tmp_path / "missing.jsonl", 2, random.Random(0), None, None)


def test_input_shorter_than_the_template_is_refused(tokenizer: Any) -> None:
    counter = TokenCounter(tokenizer, "chat")
    with pytest.raises(WorkloadError, match="shorter than the fixed part"):
        list(workloads.synthetic(counter, 1, random.Random(0), Lengths(3), None))


def test_bodies_carry_no_sampling_fields_unless_asked() -> None:
    spec = RequestSpec(messages=[{"role": "user", "content": "x"}], max_tokens=8, ignore_eos=True)
    body = spec.body("m", "chat", True, {})
    assert set(body) == {"model", "stream", "messages", "stream_options", "max_tokens", "ignore_eos"}
    assert spec.body("m", "chat", True, {"temperature": 0.6})["temperature"] == 0.6
    assert spec.body("m", "completions", False, {})["prompt"] == "x"


def test_long_context_defaults_to_100k_capped_by_the_profile(tiny_model_dir: Path, tokenizer: Any) -> None:
    from benchmarks.cli import build_parser, config_from
    from benchmarks.runner import build_workload, find_profile

    config = config_from(build_parser().parse_args(["run", "--model", "tiny-qwen3", "--workload", "long-context"]))
    assert (config.input_len, config.num_requests, config.warmup) == (100_000, 4, 1)
    profile = find_profile("tiny-qwen3")
    assert profile is not None
    config.tokenizer = str(tiny_model_dir)
    specs = build_workload(config, profile, 2)
    # The tiny profile's context is 2,048 tokens: the prompt fills it, leaving room for the output.
    expected = profile.max_model_len - 128 - 64
    assert [chat_tokens(tokenizer, s) for s in specs] == [expected, expected]
