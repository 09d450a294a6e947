"""Generate a tiny random-weight Qwen3 model and tokenizer locally: no download, deterministic.

The weights are noise, so is the text; but vLLM loads and serves it on the CPU through the
same code paths as the real models, so token counts, streaming, usage and metrics are real.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

# Qwen's special tokens, in Qwen's order, so templates and parsers see the same strings.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
]

# Qwen's ChatML template reduced to what the tiny model needs: system/user/assistant/tool turns,
# tools in the system turn, and the generation prompt.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role != 'system' %}"
    "<|im_start|>{{ message.role }}\n"
    # An assistant turn's reasoning, as Qwen3's template renders it (vLLM passes it as
    # reasoning_content): so tests can see whether reasoning in the history reached the prompt.
    "{% if message.role == 'assistant' and message.reasoning_content %}"
    "<think>\n{{ message.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ message.content if message.content is string else '' }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words the tokenizer is trained on: in code, so the tokenizer never changes.
CORPUS_WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these model token serve request stream latency throughput reason answer think step number "
    "please qwen vllm gpu cache context prompt output input user assistant system tool call "
    "function "
)

VOCAB_SIZE = 2048
SEED = 1234


def _corpus() -> list[str]:
    """Training text for the tokenizer, built in code so the result never changes."""
    words = CORPUS_WORDS.split()
    lines = []
    for i in range(4000):
        picked = [words[(i * 7 + j * 13) % len(words)] for j in range(12)]
        lines.append(" ".join(picked) + f" {i} {i * 31 % 997}.")
    return lines


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    fast.save_pretrained(out)


def build_model(out: Path, vocab_size: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # the CPU attention backend rejects head_dim 16
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        dtype="bfloat16",
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(out, safe_serialization=True)


# The generator's own source, hashed: a model made by an older version of this file is made again.
GENERATOR_STAMP = ".generator-sha256"


def _generator_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def generate(out: Path, force: bool = False) -> Path:
    """Write the model into `out` (atomically: a half-written model is never left behind)."""
    stamp = out / GENERATOR_STAMP
    current = (out / "config.json").is_file() and stamp.is_file() and stamp.read_text() == _generator_digest()
    if current and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp) / out.name
        build_tokenizer(staging)
        vocab = json.loads((staging / "tokenizer.json").read_text())["model"]["vocab"]
        vocab_size = len(vocab) + len(SPECIAL_TOKENS)
        build_model(staging, vocab_size=max(vocab_size, VOCAB_SIZE))
        eos = _token_id(staging, "<|im_end|>")
        config = json.loads((staging / "config.json").read_text())
        config.update(eos_token_id=eos, bos_token_id=_token_id(staging, "<|endoftext|>"))
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / "generation_config.json").unlink(missing_ok=True)
        (staging / GENERATOR_STAMP).write_text(_generator_digest())
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return out


def _token_id(model_dir: Path, token: str) -> int:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    for added in data["added_tokens"]:
        if added["content"] == token:
            return int(added["id"])
    raise KeyError(token)
