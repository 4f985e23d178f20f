# `make demo` and `make test` work from a fresh clone: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installing is redone only when pyproject.toml changes.
STAMP := $(VENV)/.installed-stamp
# Progress and log lines reach the terminal (and CI's log) as they happen, not in blocks.
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast bench bench-peers install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: its CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train.py

# Two workers, each test process on one thread (tests/conftest.py): most of the suite's time is
# subprocesses of train.py, which use one core each. The longest tests are collected first and an
# idle worker takes pending tests from the other (--dist worksteal), so both finish together.
test: $(STAMP)
	$(PY) -m ruff check src tests train.py
	$(PY) -m pytest -n 2 --dist worksteal --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal -m "not slow"

# BENCH_ARGS passes options, e.g. BENCH_ARGS="--since c076402 --only ppo ppo1" (an earlier commit beside today's)
bench: $(STAMP)
	$(PY) -m lightrlhf.bench $(BENCH_ARGS)

# trl's trainers beside ours in one interleaved run (outputs/bench/report.md). The peers' venvs under
# outputs/peer-envs are made on first use (a few minutes). E.g. make bench-peers RUNS=1 ONLY="sft ppo";
# BENCH_ARGS passes anything else (--steps-scale 0.1, --keep-contaminated).
bench-peers: $(STAMP)
	$(PY) -m lightrlhf.bench.peers setup
	$(PY) -m lightrlhf.bench --peers $(if $(RUNS),--runs $(RUNS)) $(if $(ONLY),--only $(ONLY)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
