# vlgrpo: `make pipeline` runs the whole default pipeline, `make test` the whole suite.
# Both create .venv if missing and install the pinned dependencies first (requirements.lock).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Offline, quiet defaults for the tools (no analytics, no hub); the CLI sets the same ones.
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export GX_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install pipeline test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $@

# `vlgrpo repro` = `dvc repro` under one MLflow parent run and the project lock; prints where results are.
pipeline: $(STAMP)
	$(BIN)/vlgrpo repro

test: $(STAMP)
	$(BIN)/pytest -q --timeout=1500

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not integration and not reliability" tests/unit

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.bench_validate
	$(BIN)/python -m tests.benchmarks.bench_evaluate
	$(BIN)/python -m tests.benchmarks.bench_pipeline
	$(BIN)/python -m tests.benchmarks.bench_grpo

# The docker/ stack built and run for real (as root): installs and starts a Docker engine when none runs
# (and stops it after), builds the images, runs the scheduled deployment through to a registered champion,
# restarts the stack and checks what must survive. Phase timings at the end. See docker/test-stack.sh.
.PHONY: test-stack
test-stack: $(STAMP)
	bash docker/test-stack.sh

clean:
	rm -rf data/cache data/manifest.jsonl models reports plots mlflow.db mlartifacts
