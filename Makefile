# Quick start: `make demo` (the whole pipeline on the embedded sample) and `make test` (every test).
# The fast loop: `make check` (lint, format check, type check, unit tests; under 2 minutes on 2 cores).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo
SOURCES := src tests benchmarks scripts
PYTEST := WANDB_MODE=offline WANDB_SILENT=true $(BIN)/python -m pytest -q -ra

.PHONY: demo test check lint format typecheck install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/selfsup pipeline --config configs/pipeline/quickstart.yaml --out $(OUT)

# Every test: unit, integration, system and benchmarks (what CI runs).
test: $(STAMP)
	$(PYTEST) $(PYTEST_ARGS)

# The fast loop before a commit.
check: lint typecheck
	$(PYTEST) -m unit tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

format: $(STAMP)
	$(BIN)/ruff format $(SOURCES)
	$(BIN)/ruff check --fix $(SOURCES)

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache
