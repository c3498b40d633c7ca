# Two commands do all the set-up: `make serve` and `make test` (see README.md).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: serve test lint format proto lock install install-dev build-info clean

# --- environments -------------------------------------------------------------------
# The lock files pin every package by hash; the project itself goes in with --no-deps.
$(VENV)/.runtime: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(MAKE) -s build-info
	touch $@

$(VENV)/.dev: requirements-dev.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-dev.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(MAKE) -s build-info
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# --- the two commands ---------------------------------------------------------------
serve: install
	$(VENV)/bin/payments migrate
	$(VENV)/bin/payments serve

test: install-dev
	source scripts/test-db.sh && $(PY) -m pytest $(PYTEST_ARGS)

# --- the rest -----------------------------------------------------------------------
lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

proto: install-dev
	sh scripts/gen-proto.sh payments/gen

# Re-pin every package (needs uv: `pip install uv`). The override lets purerpc 0.8 sit
# beside h2 >= 4.3 (see payments/purerpc_compat.py).
lock:
	uv pip compile pyproject.toml --override overrides.txt --generate-hashes --python-version 3.11 -q -o requirements.lock
	uv pip compile pyproject.toml --group dev --override overrides.txt --generate-hashes --python-version 3.11 -q -o requirements-dev.lock

# Recorded for `payments version`.
build-info:
	printf '{"commit": "%s", "build_time": "%s"}\n' "$$(git rev-parse HEAD 2>/dev/null || echo unknown)" "$$(date -u +%Y-%m-%dT%H:%M:%SZ)" > payments/_build.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
