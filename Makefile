# gmpipe entry points. `make demo` and `make test` do all set-up themselves and are safe to rerun.
#   make demo    set up, then run the demo pipeline (dvc repro of every stage, as a Prefect flow)
#   make test    set up, then run the test suite
#   make smoke   set up, then run the whole pipeline on configs/smoke.yaml in a scratch copy
#   make lint    ruff
#   make bench   set up, then run the benchmarks (reports/bench.json, reports/bench.md); BENCH_ARGS=--quick for tiny sizes
# Variables: VENV (default .venv), PYTHON (interpreter that creates it), TORCH_SPEC (default torch==2.13.0),
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu on a CPU machine without a local torch wheel),
# PYTEST_WORKERS (pytest-xdist processes for make test, default 2; 0 runs in this process), PYTEST_ARGS (extra pytest
# arguments), BENCH_ARGS (e.g. --quick, --root DIR, --threads 1).
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
BENCH_ARGS ?=
export VENV PYTHON TORCH_SPEC TORCH_INDEX_URL

.PHONY: setup demo test smoke lint bench

setup:
	@bash .ci/setup.sh

demo: setup
	@. $(VENV)/bin/activate && gmpipe pipeline

test:
	@GMPIPE_SETUP_DATA=no GMPIPE_SETUP_BROWSER=yes bash .ci/setup.sh
	@. $(VENV)/bin/activate && python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

smoke: setup
	@. $(VENV)/bin/activate && bash .ci/smoke.sh

bench: setup
	@. $(VENV)/bin/activate && python -m bench $(BENCH_ARGS)

lint: setup
	@$(VENV)/bin/ruff check gmpipe flows tests bench
