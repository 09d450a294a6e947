"""The serving engines a profile can name: the interface (base), vLLM (vllm, vllm_check), SGLang
(sglang, sglang_check, and sglang_probe, which runs in SGLang's own venv), and the registry that
gives a profile its engine."""
