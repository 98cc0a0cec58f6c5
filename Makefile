# The two commands: `make run` (serve the embedded default) and `make test` (everything).
# Both set up what they need first (venv, packages, models) and are safe to re-run.
VENV ?= .venv
PORT ?= 8000
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint bench

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/octograph up --config $(CONFIG) --port $(PORT)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/mypy service
