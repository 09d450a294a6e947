"""The tiny model is generated locally, deterministically, with Qwen's template and tokens."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer

from deploy.tiny.model import SPECIAL_TOKENS, generate


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = generate(tmp_path / "tiny-qwen3")
    assert digest(again) == digest(tiny_model_dir)


def test_shape_and_tokens(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] >= 64  # vLLM's CPU attention rejects head_dim 16
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chatml_template(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_reasoning_is_rendered_like_qwen3(tiny_model_dir: Path) -> None:
    """vLLM hands an assistant message's reasoning to the template as reasoning_content."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}],
        tokenize=False,
    )
    assert text == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"


def test_a_model_from_an_older_generator_is_made_again(tmp_path: Path) -> None:
    from deploy.tiny.model import GENERATOR_STAMP

    out = generate(tmp_path / "tiny-qwen3")
    (out / GENERATOR_STAMP).write_text("an older generator")
    (out / "tokenizer_config.json").write_text("{}")
    generate(out)
    assert (out / "tokenizer_config.json").read_text() != "{}"
    assert (out / GENERATOR_STAMP).read_text() != "an older generator"
