"""Models generated locally for the CPU: the tiny Qwen3 model (model) and its LoRA adapter (lora)."""
