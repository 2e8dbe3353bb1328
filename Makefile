# placeholder until the CLI lands; see README
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: lint test
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test:
	$(PY) -m pytest -q
