"""The serving engines a profile can name: vLLM (vllm_check) and SGLang (sglang, sglang_check, and
sglang_probe, which runs in SGLang's own venv)."""
