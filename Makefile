# The two commands of the README:
#   make run    sets up (venv + everything) and runs the appliance on the default model
#   make test   sets up and runs lint, types and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,batch,dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/inferbox serve $(ARGS)

lint: setup
	$(BIN)/ruff check runtime export api appliance tests bench
	$(BIN)/ruff format --check runtime export api appliance tests bench

typecheck: setup
	$(BIN)/mypy runtime export api appliance bench

# a pytest-xdist worker per core (at most 4), a test file per worker at a time: one worker builds the
# MiniLM package while the others run the tests that do not need it (tests/conftest.py).
# PYTEST_ARGS="-n 0 ..." runs one test at a time.
# --max-worker-restart 0: a worker that dies (a crash in native code) fails the run at once, naming
# the test it ran; a replaced worker under --dist loadfile left the run waiting for ever (pytest-xdist
# #784 and #1327: seen here once, 12:50 on 2026-12-07, the test not named).
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --max-worker-restart 0

pytest: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

test: lint typecheck pytest

bench: setup
	@command -v wrk >/dev/null || echo "note: wrk not found (apt-get install wrk); the HTTP parts fall back to a Python client"
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.run_all $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
