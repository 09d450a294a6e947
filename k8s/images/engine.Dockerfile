# The vLLM engine image the chart runs (images.engine): the pinned vLLM OpenAI server image plus
# this project, so `python -m deploy render|check|plan` run inside it against the same vLLM.
# Build from the repository root: make image  (VLLM_VERSION comes from the Makefile's pin).
ARG VLLM_VERSION=0.32.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

# The base image already holds vLLM, Ray, pydantic, PyYAML and the Hugging Face CLI (`hf`, used
# by the chart's download init container). The project is put on PYTHONPATH rather than
# pip-installed so nothing of the base image's pinned packages changes, and deploy/paths.py finds
# configs/ beside it.
WORKDIR /opt/qwen-serve
COPY pyproject.toml README.md ./
COPY configs/ configs/
COPY deploy/ deploy/
COPY serving/ serving/
ENV PYTHONPATH=/opt/qwen-serve

# Non-root: the chart runs the engine as uid/gid 1000 (engine.podSecurityContext). vLLM and
# Triton write compile caches under $HOME; Ray writes /tmp.
ENV HOME=/home/vllm
RUN (getent group 1000 >/dev/null || groupadd --gid 1000 vllm) \
    && (getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 1000 --no-create-home --shell /bin/bash vllm) \
    && mkdir -p /home/vllm /models/hf \
    && chown -R 1000:1000 /home/vllm /models/hf
USER 1000:1000

EXPOSE 8000
# The chart sets the command (python3 -m vllm.entrypoints.openai.api_server <rendered argv>).
ENTRYPOINT []
CMD ["python3", "-m", "deploy", "profiles"]
