# Two entry points on a fresh machine: `make run` (install + default pipeline), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: the CPU build on a machine without an NVIDIA GPU (no working `nvidia-smi`), else the CUDA
# build (PyPI's Linux wheel); force one with TORCH_BUILD=cpu|cuda, or give TORCH_SPEC/TORCH_INDEX.
# A wheel of this version and build already in pip's find-links (a local mirror, CI's) is used as is.
# `make torch-choice` prints the choice without installing anything.
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_BUILD ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_INDEX_cpu := https://download.pytorch.org/whl/cpu
TORCH_INDEX_cuda :=
FIND_LINKS := $(subst :, ,$(PIP_FIND_LINKS)) $(shell python3 -m pip config get global.find-links 2>/dev/null)
TORCH_WHEELS_cpu := torch-$(TORCH_VERSION)+cpu-*.whl
TORCH_WHEELS_cuda := torch-$(TORCH_VERSION)-*.whl torch-$(TORCH_VERSION)+cu*.whl
TORCH_LOCAL := $(firstword $(foreach d,$(FIND_LINKS),$(wildcard $(addprefix $(d)/,$(TORCH_WHEELS_$(TORCH_BUILD))))))
TORCH_INDEX ?= $(if $(TORCH_LOCAL),,$(TORCH_INDEX_$(TORCH_BUILD)))
TORCH_FROM := $(if $(TORCH_LOCAL),local wheel $(TORCH_LOCAL),$(if $(TORCH_INDEX),index $(TORCH_INDEX),PyPI))
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1
export HF_HUB_OFFLINE=1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test test-fast torch-choice

torch-choice:
	@echo "torch: $(TORCH_SPEC), $(TORCH_BUILD) build, from $(TORCH_FROM)"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "installing torch: $(TORCH_SPEC), $(TORCH_BUILD) build, from $(TORCH_FROM)"
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed .kdflow/vega/dvc-plots.html

# interactive `dvc plots show` pages offline: Vega inlined from npm, not loaded from a CDN
# (kdflow/vega_offline.py; without npm or a registry it says so and the pages use the CDN)
.kdflow/vega/dvc-plots.html: | $(VENV)/.installed
	-@$(PY) -m kdflow.vega_offline

run: install
	kdflow run

# TEST_WORKERS pytest-xdist processes (default 2: CI's 2 cores); each starts its own Prefect test server.
# Work-stealing keeps both busy while one runs a long end-to-end test. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow and not integration"
