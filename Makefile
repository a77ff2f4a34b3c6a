# The commands README.md names. `make test` and `make demo` set up what they need on a
# fresh Debian machine (apt packages, a .venv with the package and its extras) and skip
# the set-up that is already done.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= redis,s3,server,test
TORCH_PIN ?= torch==2.13.0
# vLLM for the integration tests: the wheel without its CUDA requirements, beside the
# packages its imports need (pinned in requirements/vllm-test.txt).
VLLM_PIN ?= vllm==0.33.0
XGRAMMAR_PIN ?= xgrammar==0.2.8
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.flexkv-installed
VLLM_STAMP := $(VENV)/.flexkv-vllm-installed

.PHONY: setup apt venv test lint typecheck pytest demo bench clean

setup: apt venv

apt:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v fio >/dev/null || missing="$$missing fio"; \
	[ -e /usr/include/liburing.h ] || missing="$$missing liburing-dev"; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	$(PYTHON) -c "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" 2>/dev/null || missing="$$missing python3-dev"; \
	$(PYTHON) -c "import ensurepip" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  $(SUDO) apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(PY): | apt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { echo "venv: installing $(TORCH_PIN) (CPU)"; $(PY) -m pip install -q "$(TORCH_PIN)"; }
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

$(VLLM_STAMP): requirements/vllm-test.txt | $(STAMP)
	@echo "venv: installing $(VLLM_PIN) --no-deps and its import-time packages"
	$(PY) -m pip install -q -r requirements/vllm-test.txt
	$(PY) -m pip install -q --no-deps "$(XGRAMMAR_PIN)" "$(VLLM_PIN)"
	@touch $(VLLM_STAMP)

venv: $(STAMP) $(VLLM_STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	@rc=0; $(VENV)/bin/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$rc

test: lint typecheck pytest

demo: setup
	$(VENV)/bin/flexkv-store demo

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
