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

test: install-dev browser-deps
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

# --- benchmarks (bench/README.md) ---------------------------------------------------
# Installs wrk and h2load (Debian: wrk, nghttp2-client) when missing, as root; fails
# loudly otherwise. Writes bench/results/<date>.json (bench-quick: quick-<date>.json).
.PHONY: bench bench-quick
bench: install-dev
	source scripts/test-db.sh && $(PY) -m bench

bench-quick: install-dev
	source scripts/test-db.sh && $(PY) -m bench --quick

# --- the browser test (e2e/test_browser_checkout.py) -------------------------------
# Debian's chromium at /usr/bin/chromium (apt-get as root when missing; apt-get update
# first when the package lists do not have it) and playwright-core as pinned by
# e2e/browser/package-lock.json (npm ci, redone when the lock changes). No browser is
# ever downloaded by npm. Fails loudly when either cannot be had.
.PHONY: browser-deps
BROWSER_DIR := e2e/browser
CHROMIUM := /usr/bin/chromium

browser-deps: $(BROWSER_DIR)/node_modules/.npm-ci-done
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "browser-deps: $(CHROMIUM) is missing; as root: apt-get install chromium" >&2; \
	    exit 1; \
	  fi; \
	  echo "browser-deps: installing Debian's chromium"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium \
	    || { apt-get update -q && apt-get install -y -q chromium; } \
	    || { echo "browser-deps: apt-get could not install chromium" >&2; exit 1; }; \
	fi
	@test -x $(CHROMIUM) || { echo "browser-deps: still no $(CHROMIUM)" >&2; exit 1; }

$(BROWSER_DIR)/node_modules/.npm-ci-done: $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "browser-deps: npm (Node.js 20) is needed" >&2; exit 1; }
	cd $(BROWSER_DIR) && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
	touch $@
