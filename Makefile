# zsad — the two commands that work on a fresh machine: `make bench` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export PYTHONHASHSEED ?= 0

.PHONY: install test test-fast bench bench-gpu lint format sweep clean

install: $(STAMP)

# The stamp depends on the files that define the environment: re-running is instant unless they change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile tests || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected: failing" ; exit $$rc; }

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install
	$(BIN)/zsad bench experiments/bench/default.yaml

bench-gpu: install
	$(BIN)/python -m zsad.bench.throughput --out results/throughput

lint: install
	$(BIN)/ruff check zsad data_modules tests
	$(BIN)/ruff format --check zsad data_modules tests

format: install
	$(BIN)/ruff format zsad data_modules tests
	$(BIN)/ruff check --fix zsad data_modules tests

sweep: install
	@echo "wandb sweep experiments/sweeps/<method>.yaml && wandb agent <entity/project/id>"

clean:
	rm -rf results runs .pytest_cache
