# One-command set-up: `make run` (pipeline on the embedded default data) and `make test`.
# `make setup` is idempotent: it reinstalls only when pyproject.toml changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1

.PHONY: setup run test bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf $(VENV) .pytest_cache
