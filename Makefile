# kdprune: `make repro` runs the pipeline, `make test` runs the tests; both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Wheels that lie on local disk on some machines (torch's CUDA build); harmless elsewhere.
FIND_LINKS := $(if $(wildcard /opt/pypi-more/files),--find-links /opt/pypi-more/files)
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: repro params test test-fast bench lock clean

# The team stack (PostgreSQL, an S3 server, an MLflow server): make team-up / team-join / team-down.
-include scripts/team.mk

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install -q uv==0.13.9
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode $(FIND_LINKS) -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --no-deps -e .
	$(BIN)/python -m compileall -q src  # the editable package's bytecode too, which uv leaves out
	touch $@

repro: $(VENV)/.installed
	dvc repro
	@echo; cat reports/comparison.md

# params.yaml from conf/ (what `dvc exp run -S` composes), e.g. `make params PRESET=mnist`
params: $(VENV)/.installed
	kdprune params $(if $(PRESET),preset=$(PRESET))

# Two workers, a test file each: most tests wait on subprocesses (dvc, stages, servers), so two overlap well.
# pytest keeps its assertion-rewritten test modules in __pycache__ only where Python may write bytecode: under
# a PYTHONDONTWRITEBYTECODE from the environment (container images set it) every worker rewrote every test
# module at every run, 3 s of a 58 s `make test-fast`.
PYTEST := env -u PYTHONDONTWRITEBYTECODE python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder
test: $(VENV)/.installed
	$(PYTEST) tests

# the edit loop: everything but the tests that drive DVC, servers and whole pipelines in subprocesses
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" tests

bench: $(VENV)/.installed
	python bench/latency.py

lock:
	uv pip compile pyproject.toml --extra dev --python-version 3.11 $(FIND_LINKS) --no-header -o requirements.lock

clean:
	rm -rf $(VENV)
