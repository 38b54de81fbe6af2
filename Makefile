# Two commands on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# What each target needs installed: the benchmark the package, tokamax (a
# backend it times where tokamax has kernels), hf (torch and transformers: the
# peer it is measured against) and plot (matplotlib); the tests and tools
# also the dev extra (pytest, ruff).
BENCH_STAMP := $(VENV)/.installed-bench
TEST_STAMP  := $(VENV)/.installed-test

.PHONY: bench test lint clean venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall when the project's own install files change. The test install
# is a superset of the benchmark's, so it marks both done.
$(BENCH_STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q -e ".[tokamax,hf,plot]"
	touch $(BENCH_STAMP)

$(TEST_STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q -e ".[dev,tokamax,hf,plot]"
	touch $(TEST_STAMP) $(BENCH_STAMP)

venv: $(TEST_STAMP)

# BENCH_ARGS: extra options, e.g. make bench BENCH_ARGS="--json rows.json --plot rows.png"
bench: $(BENCH_STAMP)
	$(VENV)/bin/fusedmoe bench $(BENCH_ARGS)

# --dist loadfile: a file's tests run on one worker, so the multi-device
# processes that all tests of a file wait on (test_parallel, test_model_mesh)
# run once, not once per worker. (--dist loadgroup would group them by mark,
# but pytest-xdist 3.8 cannot with pytest 9.2: it renames node ids pytest no
# longer reads.)
test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
