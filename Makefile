# One-command set-up: `make run` (the pipeline on the embedded default data) and `make test`.
# `make setup` is idempotent: it reinstalls only when pyproject.toml changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
POCUS := ../shared/data/pocus

export DVC_NO_ANALYTICS := 1
# dvc stages call `sonossl`: the one from this venv.
export PATH := $(BIN):$(PATH)

.PHONY: setup run test bench results contact-sheet clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The POCUS stage needs the real videos beside the repository; without them, everything else still runs.
run: setup
	@if [ -d $(POCUS) ]; then dvc repro; \
	else echo "note: $(POCUS) not found: skipping preprocess@pocus and crossval"; dvc repro export evaluate; fi
	@echo "results: reports/results.md (and reports/crossval.md); \`make results\` copies them into README.md"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/preprocess.py
	$(BIN)/python benchmarks/train_throughput.py

# Copy the results table of the last `dvc repro` (reports/results.md) into the README, between its markers.
results:
	$(BIN)/python -m sonossl.cli readme-results --results reports/results.md --readme README.md

contact-sheet: setup
	sonossl contact-sheet --raw data/raw/sim --out docs/contact_sheet.png --per-class 6 --real $(POCUS)

clean:
	rm -rf $(VENV) .pytest_cache
