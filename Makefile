VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: up test lint bench install clean

# A local cluster of 3 nodes on the embedded file-lock backend (no server needed), with a live table.
up: $(PY)
	$(PY) -m loadtest up

# Install the servers, the venv and the package, then run lint and the whole test suite.
test:
	bash scripts/install-test-deps.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(PY)
	$(VENV)/bin/ruff check .

# Lock-operation latency per backend (a table), then the full benchmark report: bench/report.md,
# bench/report.json and PNG plots (tens of minutes; `$(PY) -m loadtest bench --quick` takes a couple).
bench: $(PY)
	$(PY) -m loadtest.bench_locks
	$(PY) -m loadtest bench

$(PY):
	bash scripts/install-test-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
