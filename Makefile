VENV ?= .venv
PY := $(VENV)/bin/python
#: pytest-xdist workers. The real-process tests mostly wait on the clock, so more workers than cores pay.
WORKERS ?= 4
PYTEST := $(PY) -m pytest -n $(WORKERS) --dist loadgroup
# Every worker, node and server launcher is a new interpreter: let them keep compiled bytecode (an
# environment that turns it off makes each one compile the project and the tests again, seconds apiece).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: up test test-fast lint bench install clean

# A local cluster of 3 nodes on the embedded file-lock backend (no server needed), with a live table.
up: $(PY)
	$(PY) -m loadtest up

# Install the servers, the venv and the package, then run lint, the type check and the whole test suite: the
# in-process tiers (CPU-bound), then the real-process tiers (clusters timed against leases, mostly waiting),
# each on $(WORKERS) workers: more workers than that only slow each other's clusters down on 2 cores.
test:
	bash scripts/install-test-deps.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PYTEST) -m "contract or unit or sim"
	$(PYTEST) -m "backend or cluster or bench"

# The edit-run loop: the contract on every backend, the in-process tests, the simulator's smoke seeds (tiers and
# the few slow tests it leaves to `make test`: tests/conftest.py). Its tests mostly wait: 8 workers.
test-fast: $(PY)
	$(PY) -m pytest -n 8 --dist loadgroup -m "(contract or unit or sim) and not slow"

lint: $(PY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Lock-operation latency per backend (a table), then the full benchmark report: bench/report.md,
# bench/report.json and PNG plots (tens of minutes; `$(PY) -m loadtest bench --quick` takes a couple).
bench: $(PY)
	$(PY) -m loadtest.bench_locks
	$(PY) -m loadtest bench

$(PY):
	bash scripts/install-test-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
