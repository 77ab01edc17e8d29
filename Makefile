# vlgrpo: `make pipeline` runs the whole default pipeline, `make test` the whole suite.
# Both create .venv if missing and install the pinned dependencies first (requirements.lock).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# The offline, quiet tool defaults (no analytics, no hub) live in one place, vlgrpo/offline.py: the CLI, the
# stage flows and the test suite apply them (tasks/_env.py, tests/__init__.py), so nothing here repeats them.
export PATH := $(BIN):$(PATH)

.PHONY: install vllm-env pipeline test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $@

# The rollout engine's own environment (train.rollout.engine: vllm): vLLM pins its own torch and transformers,
# so it gets a venv of its own. Pinned and idempotent (stamp file); the workarounds the CPU build needs live in
# the script. ~2 minutes and ~3.5 GB on a fresh machine.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): scripts/vllm_env.sh
	bash scripts/vllm_env.sh $(VLLM_VENV)

# `vlgrpo repro` = `dvc repro` under one MLflow parent run and the project lock; prints where results are.
pipeline: $(STAMP)
	$(BIN)/vlgrpo repro

# Two test files at a time (tests/conftest.py says why that is safe); TEST_WORKERS=0 runs them one by one.
TEST_WORKERS ?= 2

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/pytest -q --timeout=1500 --durations=30 -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not integration and not reliability" tests/unit

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m tests.benchmarks.bench_validate
	$(BIN)/python -m tests.benchmarks.bench_evaluate
	$(BIN)/python -m tests.benchmarks.bench_pipeline
	$(BIN)/python -m tests.benchmarks.bench_grpo
	$(BIN)/python -m tests.benchmarks.bench_rollout
	$(BIN)/python -m tests.benchmarks.bench_memory

# The docker/ stack built and run for real (as root): installs and starts a Docker engine when none runs
# (and stops it after), builds the images, runs the scheduled deployment through to a registered champion,
# restarts the stack and checks what must survive. Phase timings at the end. See docker/test-stack.sh.
.PHONY: test-stack
test-stack: $(STAMP)
	bash docker/test-stack.sh

clean:
	rm -rf data/cache data/manifest.jsonl models reports plots mlflow.db mlartifacts
