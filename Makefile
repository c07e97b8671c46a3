# The two commands of the README: `make quickstart` and `make test`. Both build .venv from the
# pinned requirement files first, so they work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test lint bench clean-quickstart

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

quickstart: $(VENV)/.runtime
	$(PY) quickstart.py

# Two worker processes, one test file each at a time (module fixtures are built once): the
# suite is bound by TensorFlow's start-up and tracing as much as by arithmetic.
test: $(VENV)/.dev
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.dev
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean-quickstart:
	rm -rf data/synthetic checkpoints/quickstart_* logs/quickstart_*
