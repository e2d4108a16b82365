# make demo: the whole pipeline on this machine; make test: the test suite (needs redis-server);
# make test-fast: the unit and policy tests, no worker processes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q
# pytest-xdist workers of make test, each with its own Redis and sandbox; a module's tests
# stay on one worker (loadfile), in the order tests/schedule_kit.py gives (slowest first).
# Four on two cores: most integration tests wait on processes, sleeps and leases, not CPU.
TEST_WORKERS ?= 4
PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
FAST_WORKERS ?= 4
# Compiled modules and pytest's rewritten test modules are cached between runs, even where
# the environment says not to (each of the pytest processes would compile all of them
# again: a third of the edit loop's time).
unexport PYTHONDONTWRITEBYTECODE
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv demo api dev constraints test test-fast lint bench chaos clean distclean

venv: $(STAMP)

# Reinstalled whenever pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/remixq demo

# The HTTP API (docs at http://$(HOST):$(PORT)/docs); set REMIX_API_TOKENS in production.
api: venv
	$(BIN)/uvicorn producers.http:app --host $(HOST) --port $(PORT)

# The whole pipeline against the local sandbox: Procfile.dev (Procfile: production only).
dev: venv
	$(BIN)/honcho start -f Procfile.dev

# Regenerate the image's pinned dependencies from this venv (deploy/constraints.txt).
constraints: venv
	$(BIN)/python deploy/freeze_constraints.py

# pytest exits 5 when it collects no tests; that fails the target like any other error.
test: venv
	@status=0; $(BIN)/python -m pytest $(PARALLEL) $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; fi; \
	exit $$status

# The edit loop: every test not marked integration (no worker, sandbox or app process).
test-fast: venv
	@status=0; $(BIN)/python -m pytest -n $(FAST_WORKERS) -m "not integration" $(PYTEST_ARGS) \
		|| status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test-fast: no tests were collected" >&2; fi; \
	exit $$status

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy worker producers sandbox bench

bench: venv
	@if [ -f bench/__main__.py ]; then $(BIN)/python -m bench --write-docs; \
	else echo "make bench: no benchmark yet (bench/__main__.py is missing)"; fi

# The chaos suite, bigger than in the tests (1,000 jobs a scenario, about 9 minutes);
# its figures go to docs/reliability.md.
chaos: venv
	$(BIN)/python -m bench.chaos --write-docs

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-output
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
