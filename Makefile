# Two entry points on a fresh machine: `make run` (install + default pipeline), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; users with a GPU set TORCH_SPEC (e.g. "torch" with a CUDA index).
TORCH_SPEC ?= torch==2.13.0
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1
export HF_HUB_OFFLINE=1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test test-fast

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	kdflow run

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not integration"
